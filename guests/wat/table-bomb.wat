;; Hostile: grows its function table far past any sane size.
;; A WASI preview 1 command (exports _start), written as text.
(module
  (table $t 1 funcref)
  (func (export "_start")
    ;; Ask for two million more slots in one go.
    (drop (table.grow $t (ref.null func) (i32.const 2000000))))
  (memory (export "memory") 1))

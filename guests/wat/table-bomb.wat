;; Hostile: grows its function table far past any sane size.
;; A WASI preview 1 command (exports _start), written as text.
(module
  (table $t 1 funcref)
  (func (export "_start")
    ;; Ask for 200,000 more slots in one go: twice the default cap.
    (drop (table.grow $t (ref.null func) (i32.const 200000))))
  (memory (export "memory") 1))

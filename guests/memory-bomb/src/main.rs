//! Hostile: allocates and touches memory until something stops it.
fn main() {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk = vec![0u8; 1 << 20];
        // Touch every page so the memory is really used, not just reserved.
        for i in (0..chunk.len()).step_by(4096) {
            chunk[i] = 1;
        }
        hoard.push(std::hint::black_box(chunk));
        if hoard.len() % 64 == 0 {
            eprintln!("holding {} MiB", hoard.len());
        }
    }
}

//! Hostile: an infinite loop that never calls the host.
fn main() {
    let mut counter = 0u64;
    loop {
        counter = std::hint::black_box(counter.wrapping_add(1));
    }
}

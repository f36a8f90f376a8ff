//! Hostile: recurses without bound. The depth comes from the arguments so the
//! compiler cannot turn the recursion into a loop or a constant.
#[inline(never)]
fn descend(depth: u64, salt: u64) -> u64 {
    if depth == 0 {
        return salt;
    }
    let below = descend(depth - 1, salt ^ depth);
    below.rotate_left(7) ^ depth.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn main() {
    let depth = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(u64::MAX);
    println!("{}", descend(depth, std::env::args().count() as u64));
}

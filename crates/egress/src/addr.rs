//! Which upstream addresses the proxy refuses to dial unless a rule names
//! them: everything that is not the public Internet.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Is `address` one the proxy refuses to dial unless a rule names it:
/// loopback, private (RFC 1918, CGNAT, ULA), link-local (including the cloud
/// metadata address 169.254.169.254), unspecified, multicast, broadcast,
/// reserved, or an IPv6 form that embeds such an IPv4 address?
pub fn is_forbidden(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(address: Ipv4Addr) -> bool {
    let [a, b, c, _] = address.octets();
    address.is_unspecified()
        || a == 0 // "this network", 0.0.0.0/8
        || address.is_loopback() // 127.0.0.0/8
        || address.is_private() // 10/8, 172.16/12, 192.168/16
        || (a == 100 && (b & 0xc0) == 64) // CGNAT 100.64.0.0/10
        || address.is_link_local() // 169.254.0.0/16, metadata included
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments 192.0.0.0/24
        || (a == 198 && (b & 0xfe) == 18) // benchmarking 198.18.0.0/15
        || address.is_multicast() // 224.0.0.0/4
        || a >= 240 // reserved 240.0.0.0/4 and broadcast
}

fn forbidden_v6(address: Ipv6Addr) -> bool {
    let segments = address.segments();
    if address.is_unspecified() || address.is_loopback() || address.is_multicast() {
        return true;
    }
    // Unique local fc00::/7, link-local fe80::/10, deprecated site-local fec0::/10.
    if (segments[0] & 0xfe00) == 0xfc00 || (segments[0] & 0xffc0) == 0xfe80 || (segments[0] & 0xffc0) == 0xfec0 {
        return true;
    }
    // Forms that carry an IPv4 address: the address they reach decides.
    if let Some(v4) = address.to_ipv4_mapped() {
        return forbidden_v4(v4);
    }
    let embedded =
        Ipv4Addr::new((segments[6] >> 8) as u8, segments[6] as u8, (segments[7] >> 8) as u8, segments[7] as u8);
    // IPv4-compatible ::a.b.c.d (deprecated) and NAT64 64:ff9b::/96.
    if segments[..6] == [0; 6] || segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return forbidden_v4(embedded);
    }
    // 6to4 2002:AABB:CCDD::/48 embeds an IPv4 address in its second and third segments.
    if segments[0] == 0x2002 {
        let v4 =
            Ipv4Addr::new((segments[1] >> 8) as u8, segments[1] as u8, (segments[2] >> 8) as u8, segments[2] as u8);
        return forbidden_v4(v4);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forbidden(text: &str) -> bool {
        is_forbidden(text.parse().unwrap())
    }

    #[test]
    fn internal_addresses_are_forbidden() {
        for address in [
            "127.0.0.1",
            "127.8.9.10",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.254",
            "169.254.169.254",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::1",
        ] {
            assert!(forbidden(address), "{address} should be forbidden");
        }
    }

    #[test]
    fn public_addresses_are_not() {
        for address in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "192.0.2.1",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
            "2002:0101:0101::1",
        ] {
            assert!(!forbidden(address), "{address} should be allowed");
        }
    }
}

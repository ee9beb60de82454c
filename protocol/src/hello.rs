//! The Hello exchange: what each agent states about itself, and whether two agents can work together.

use crate::pb::Hello;

/// Bumped on any incompatible change of the messages or streams.
pub const PROTOCOL_VERSION: u32 = 5;
// 3: post-copy faults on a fault link of their own (Prepared.fault_port, FaultLinkHello).
// 4: post-copy's Detach: the target watches the link until the source has recorded delivery.
// 5: Failed.copy_gone: after Commit the source resumes its original on the target's word alone.

/// Oldest CRIU that works on current kernels (3.17 fails on the vDSO) and has everything the agents use.
pub const MIN_CRIU: (u32, u32) = (4, 1);

/// Parses "4.2.1" or "4.1" into (major, minor).
pub fn parse_criu_version(v: &str) -> Option<(u32, u32)> {
    let mut it = v.trim().split('.');
    let major = it.next()?.parse().ok()?;
    let minor = it.next().unwrap_or("0").parse().ok()?;
    Some((major, minor))
}

/// Why a source (`local`) cannot migrate to a target (`remote`), or `Ok`. Checked before anything is
/// frozen; each reason names the difference and what to do.
pub fn check_compatible(local: &Hello, remote: &Hello) -> Result<(), String> {
    if remote.protocol_version != local.protocol_version {
        return Err(format!(
            "protocol version differs: this agent speaks {}, {} speaks {}; run the same migrate release on both hosts",
            local.protocol_version, remote.host_name, remote.protocol_version
        ));
    }
    if remote.arch != local.arch {
        return Err(format!(
            "architecture differs: {} here, {} on {}; a process can only move between hosts of the same architecture",
            local.arch, remote.arch, remote.host_name
        ));
    }
    if let Some(h) = [local, remote].into_iter().find(|h| h.page_size as usize != crate::pages::PAGE_SIZE) {
        return Err(format!(
            "{} has {}-byte pages; this release moves memory in {}-byte pages only (CRIU images are not \
             portable across page sizes either)",
            h.host_name,
            h.page_size,
            crate::pages::PAGE_SIZE
        ));
    }
    for h in [local, remote] {
        match parse_criu_version(&h.criu_version) {
            Some(v) if v >= MIN_CRIU => {}
            _ => {
                return Err(format!(
                    "CRIU on {} is {:?}, older than {}.{} or missing; run deploy/install.sh there",
                    h.host_name, h.criu_version, MIN_CRIU.0, MIN_CRIU.1
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(host: &str) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
            host_name: host.into(),
            criu_version: "4.2.1".into(),
            arch: "x86_64".into(),
            page_size: 4096,
            kernel_release: "6.18".into(),
            uffd: true,
            soft_dirty: false,
            mem_available: 1 << 30,
        }
    }

    #[test]
    fn compatibility_rules() {
        let a = hello("a");
        check_compatible(&a, &hello("b")).unwrap();
        let mut b = hello("b");
        b.arch = "aarch64".into();
        assert!(check_compatible(&a, &b).unwrap_err().contains("architecture differs"));
        let mut b = hello("b");
        b.page_size = 65536;
        assert!(check_compatible(&a, &b).unwrap_err().contains("b has 65536-byte pages"));
        // Two hosts alike, but not with the pages stream's page size.
        let mut a16 = hello("a");
        a16.page_size = 16384;
        let mut b16 = hello("b");
        b16.page_size = 16384;
        assert!(check_compatible(&a16, &b16).unwrap_err().contains("4096-byte pages only"));
        let mut b = hello("b");
        b.criu_version = "3.17".into();
        assert!(check_compatible(&a, &b).unwrap_err().contains("deploy/install.sh"));
        let mut b = hello("b");
        b.protocol_version = 99;
        assert!(check_compatible(&a, &b).unwrap_err().contains("protocol version"));
    }

    #[test]
    fn criu_versions() {
        assert_eq!(parse_criu_version("4.2.1"), Some((4, 2)));
        assert_eq!(parse_criu_version("4.1"), Some((4, 1)));
        assert_eq!(parse_criu_version("junk"), None);
    }
}

//! Several sites on one machine, for `elea demo` and the multi-site tests: WAN links
//! ([`wan`]: a userspace TCP relay with a delay, a bandwidth cap and a cut) and a bed of sites
//! ([`sites`]: one network namespace per site, joined by those links).

pub mod sites;
pub mod wan;

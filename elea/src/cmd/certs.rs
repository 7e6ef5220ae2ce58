//! `elea certs`: a cluster's CA and its certificates.

use elea_auth::Role;
use elea_auth::certs::{self, Request};

use crate::cli::CertsCmd;

pub(crate) fn certs(c: CertsCmd) -> anyhow::Result<()> {
    match c {
        CertsCmd::Init { dir } => {
            let cluster = certs::init(&dir)?;
            println!("cluster {cluster}");
            println!("CA: {}", dir.join(certs::CA_CERT).display());
            println!("CA key (keep it secret): {}", dir.join(certs::CA_KEY).display());
        }
        CertsCmd::Issue { dir, role, name, volumes, out, days } => {
            let role: Role = role.parse()?;
            let id = certs::issue(&dir, &Request { role, name, volumes, days }, &out)?;
            println!("issued {id}, valid for {days} days");
            println!("certificate: {}", certs::with_ext(&out, "pem").display());
            println!("key: {}", certs::with_ext(&out, "key").display());
        }
    }
    Ok(())
}

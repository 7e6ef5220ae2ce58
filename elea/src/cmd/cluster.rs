//! `elea cluster`: membership changes and leader transfer.

use std::time::Duration;

use anyhow::bail;
use elea_metadata::client::parse_addrs;
use elea_metadata::proto::change_membership_request::Kind;

use crate::cli::{ClusterCmd, client};

pub(crate) async fn cluster(c: ClusterCmd) -> anyhow::Result<()> {
    match c {
        ClusterCmd::Add { meta, node_id, addr, learner } => {
            let kind = if learner { Kind::AddLearner } else { Kind::AddVoter };
            let members = client(&meta)?.change_membership(kind, node_id, &addr).await?;
            println!("added node {node_id} at {addr}{}", if learner { " as a learner" } else { "" });
            print_members(&members);
        }
        ClusterCmd::Remove { meta, node_id } => {
            let members = client(&meta)?.change_membership(Kind::Remove, node_id, "").await?;
            println!("removed node {node_id}");
            print_members(&members);
        }
        ClusterCmd::TransferLeader { meta, to } => {
            let c = client(&meta)?;
            c.transfer_leader(to).await?;
            let addrs = parse_addrs(&meta.meta)?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                for a in &addrs {
                    if let Ok(s) = c.status_of(a).await
                        && s.leader_id == to
                    {
                        println!("node {to} is the leader (term {})", s.term);
                        return Ok(());
                    }
                }
                if tokio::time::Instant::now() > deadline {
                    bail!("node {to} did not become the leader within 10 s");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Ok(())
}

pub(crate) fn print_members(members: &[elea_metadata::proto::Member]) {
    for m in members {
        println!("  node {:>3}  {}{}", m.node_id, m.addr, if m.learner { "  (learner)" } else { "" });
    }
}

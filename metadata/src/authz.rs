//! Who may ask what of the metadata service, in a cluster with certificates.
//!
//! Every command and query is classified here, once, by what it touches ([`Need`]); the
//! service checks the caller's certificate against it before anything is applied or
//! forwarded ([`allows`]). `meta` certificates may do everything (a follower forwards its
//! callers' requests to the leader under its own certificate, after checking them), and so may
//! `admin` ones. A `gateway` may work in the volumes its certificate names and nowhere else; a
//! `cache` node may make the calls the data path's workers make, and no namespace change.

use elea_auth::{Identity, Role};
use elea_common::VolumeId;
use elea_fsm::{Op, Query};

/// What a request touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    /// Nothing of any one volume: cluster status, slice ids, where cache nodes are.
    Any,
    /// A mount's own session (open, renew, close).
    Session,
    /// The namespace of one volume, read or changed.
    Volume(VolumeId),
    /// One volume, by name.
    VolumeNamed(String),
    /// The data path's bookkeeping: cache node registry, tiering, re-replication, garbage
    /// collection, session expiry.
    Internal,
    /// Volumes and membership.
    Admin,
}

impl Need {
    pub fn of_op(op: &Op) -> Need {
        match op {
            Op::CreateVolume { .. }
            | Op::CreateVolumeIn { .. }
            | Op::AddSite { .. }
            | Op::AddStore { .. }
            | Op::CreateVolumeGroup { .. }
            | Op::AddGroupMember { .. }
            | Op::RemoveGroupMember { .. }
            | Op::StartMigration { .. }
            | Op::SetVolumeHome { .. }
            | Op::RegisterMetaNode { .. } => Need::Admin,
            Op::Mknod { vol, .. }
            | Op::Mkdir { vol, .. }
            | Op::Symlink { vol, .. }
            | Op::Link { vol, .. }
            | Op::Unlink { vol, .. }
            | Op::Rmdir { vol, .. }
            | Op::Rename { vol, .. }
            | Op::SetAttr { vol, .. }
            | Op::SetXattr { vol, .. }
            | Op::RemoveXattr { vol, .. }
            | Op::WriteSlice { vol, .. }
            | Op::WriteSlicePieces { vol, .. }
            | Op::WriteInline { vol, .. }
            | Op::Fallocate { vol, .. }
            | Op::Open { vol, .. }
            | Op::Release { vol, .. }
            | Op::SetLk { vol, .. }
            | Op::Flock { vol, .. }
            | Op::AllocInodes { vol, .. } => Need::Volume(*vol),
            Op::As { op, .. } => Need::of_op(op),
            Op::OpenSession { .. } | Op::Heartbeat { .. } | Op::CloseSession { .. } => Need::Session,
            Op::AllocSlices { .. } => Need::Any,
            Op::ExpireSessions
            | Op::ExtendSessions
            | Op::RegisterCacheNode { .. }
            | Op::CacheHeartbeat { .. }
            | Op::MarkTiered { .. }
            | Op::ReplaceReplica { .. }
            | Op::ForgetSlices { .. }
            | Op::DropReplica { .. }
            | Op::SpillInline { .. }
            | Op::MigrationProgress { .. }
            | Op::MigrationPass { .. }
            | Op::MigrationSourceDeleted { .. } => Need::Internal,
        }
    }

    pub fn of_query(q: &Query) -> Need {
        match q {
            // Answered whole to others, and only with the caller's volumes to a gateway.
            Query::ListVolumes
            | Query::CacheNodes
            | Query::SliceLocs { .. }
            | Query::SliceData { .. }
            | Query::DataIdentity
            | Query::Sites
            | Query::Groups
            | Query::Migration { .. }
            | Query::Migrations => Need::Any,
            Query::VolumeByName { name } => Need::VolumeNamed(name.clone()),
            Query::Lookup { vol, .. }
            | Query::GetAttr { vol, .. }
            | Query::ReadDir { vol, .. }
            | Query::ReadLink { vol, .. }
            | Query::GetXattr { vol, .. }
            | Query::ListXattr { vol, .. }
            | Query::StatFs { vol }
            | Query::ReadChunk { vol, .. }
            | Query::GetLk { vol, .. } => Need::Volume(*vol),
            Query::SessionInfo { .. }
            | Query::StagedBlocks { .. }
            | Query::PendingDeletes { .. }
            | Query::InlineSlices { .. }
            | Query::MigrationBlocks { .. } => Need::Internal,
        }
    }
}

/// Whether `who` may make a request that needs `need`; `volume_name` names a volume id (for
/// a gateway's [`Need::Volume`]), `None` when there is no such volume. `Err` says why not.
pub fn allows(
    who: &Identity,
    need: &Need,
    volume_name: impl FnOnce(VolumeId) -> Option<String>,
) -> Result<(), String> {
    let refuse = |what: &str| Err(format!("{who} may not {what}"));
    match (who.role, need) {
        (Role::Meta | Role::Admin, _) | (_, Need::Any) => Ok(()),
        (Role::Gateway, Need::Session) => Ok(()),
        (Role::Gateway, Need::VolumeNamed(name)) if who.may_use_volume(name) => Ok(()),
        (Role::Gateway, Need::VolumeNamed(name)) => refuse(&format!("use volume {name:?}")),
        (Role::Gateway, Need::Volume(vol)) => match volume_name(*vol) {
            Some(name) if who.may_use_volume(&name) => Ok(()),
            Some(name) => refuse(&format!("use volume {name:?}")),
            None => refuse(&format!("use volume {vol} (there is none)")),
        },
        (Role::Gateway, Need::Internal) => refuse("make the cache nodes' bookkeeping calls"),
        (Role::Cache, Need::Internal | Need::VolumeNamed(_)) => Ok(()),
        // A cache node reads what it tiers and repairs, and changes no namespace.
        (Role::Cache, Need::Volume(_)) => refuse("change a volume's namespace"),
        (Role::Cache, Need::Session) => refuse("open mount sessions"),
        (Role::Gateway | Role::Cache, Need::Admin) => refuse("change volumes or membership (admin only)"),
    }
}

#[cfg(test)]
mod tests {
    use elea_auth::ClusterId;

    use super::*;

    fn id(role: Role, volumes: &[&str]) -> Identity {
        Identity {
            cluster: ClusterId::parse("0123456789abcdef0123456789abcdef").unwrap(),
            role,
            name: "x".into(),
            volumes: volumes.iter().map(|v| v.to_string()).collect(),
        }
    }

    fn names(v: VolumeId) -> Option<String> {
        [(1, "a"), (2, "b")].iter().find(|(i, _)| *i == v).map(|(_, n)| n.to_string())
    }

    #[test]
    fn each_role_gets_what_it_needs_and_nothing_else() {
        let gw = id(Role::Gateway, &["a"]);
        let unlink = Op::Unlink { vol: 1, parent: 1, name: b"f".to_vec() };
        let other = Op::Unlink { vol: 2, parent: 1, name: b"f".to_vec() };
        let create = Op::CreateVolume { name: "c".into(), config: Default::default() };
        let meta_node = Op::RegisterMetaNode { id: 1, site: "a".into(), addr: "x:1".into() };
        for who in [&gw, &id(Role::Cache, &[])] {
            assert!(
                allows(who, &Need::of_op(&meta_node), names).is_err(),
                "only meta nodes say where they run"
            );
            assert!(allows(who, &Need::of_op(&Op::AddSite { name: "s".into() }), names).is_err());
            assert!(allows(who, &Need::of_query(&Query::Sites), names).is_ok());
        }
        let tiered = Op::MarkTiered { store: 0, blocks: vec![] };
        assert!(allows(&gw, &Need::of_op(&unlink), names).is_ok());
        let e = allows(&gw, &Need::of_op(&other), names).unwrap_err();
        assert!(e.contains("volume \"b\""), "{e}");
        assert!(allows(&gw, &Need::Volume(9), names).unwrap_err().contains("there is none"));
        assert!(allows(&gw, &Need::of_op(&tiered), names).is_err());
        assert!(allows(&gw, &Need::of_op(&create), names).is_err());
        assert!(allows(&gw, &Need::of_op(&Op::OpenSession { name: "m".into(), ttl_ms: 1 }), names).is_ok());
        assert!(allows(&gw, &Need::of_query(&Query::VolumeByName { name: "a".into() }), names).is_ok());
        assert!(allows(&gw, &Need::of_query(&Query::VolumeByName { name: "b".into() }), names).is_err());
        // An `As` is checked by what it wraps.
        let caller = elea_fsm::Caller { uid: 0, gid: 0, groups: vec![] };
        let wrapped = Op::As { caller, op: Box::new(other.clone()) };
        assert!(allows(&gw, &Need::of_op(&wrapped), names).is_err());

        let cache = id(Role::Cache, &[]);
        assert!(allows(&cache, &Need::of_op(&tiered), names).is_ok());
        assert!(allows(&cache, &Need::of_op(&unlink), names).is_err());
        assert!(allows(&cache, &Need::of_op(&create), names).is_err());
        for who in [id(Role::Admin, &[]), id(Role::Meta, &[])] {
            for op in [&unlink, &other, &create, &tiered] {
                assert!(allows(&who, &Need::of_op(op), names).is_ok());
            }
        }
    }
}

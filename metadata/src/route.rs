//! Routing a control group client's requests to the groups they belong to. A volume that
//! lives in a Raft group of its own is served by that group; so are the blocks of its slices,
//! whose ids fall in the group's range ([`elea_fsm::group_of_slice`]). A client of the
//! control group sends each request about such a volume or slice to the volume's group,
//! splits requests that name slices of several groups, and walks the paged lists (staged
//! blocks, deleted slices, inline slices, volumes) through every group in order, so its
//! callers (cache nodes, the CLI) see one cluster.
//!
//! A gateway talks to its volume's group directly ([`MetaClient::volume_client`]): none of
//! this is on its path.

use elea_common::ids::DEFAULT_GROUP;
use elea_common::{GroupId, SliceId, VolumeId};
use elea_fsm::{Op, Query, Reply, group_of_slice};

use crate::api::unexpected;
use crate::client::{ClientError, MetaClient};

/// Where an op goes.
pub(crate) enum Route {
    /// To this client's group.
    Here,
    To(GroupId),
    /// In parts, one per group, each applied there; the answer is `Ok` when every part is.
    Split(Vec<(GroupId, Op)>),
}

/// The volume an op is about.
fn op_volume(op: &Op) -> Option<VolumeId> {
    match op {
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
        | Op::Fallocate { vol, .. }
        | Op::Open { vol, .. }
        | Op::Release { vol, .. }
        | Op::SetLk { vol, .. }
        | Op::Flock { vol, .. }
        | Op::AllocInodes { vol, .. }
        | Op::WriteSlicePieces { vol, .. }
        | Op::WriteInline { vol, .. }
        | Op::AddStore { vol, .. }
        | Op::StartMigration { vol, .. }
        | Op::MigrationProgress { vol, .. }
        | Op::MigrationPass { vol, .. }
        | Op::MigrationSourceDeleted { vol, .. } => Some(*vol),
        Op::As { op, .. } => op_volume(op),
        _ => None,
    }
}

/// The volume a query is about.
fn query_volume(q: &Query) -> Option<VolumeId> {
    match q {
        Query::Lookup { vol, .. }
        | Query::GetAttr { vol, .. }
        | Query::ReadDir { vol, .. }
        | Query::ReadLink { vol, .. }
        | Query::GetXattr { vol, .. }
        | Query::ListXattr { vol, .. }
        | Query::StatFs { vol }
        | Query::ReadChunk { vol, .. }
        | Query::GetLk { vol, .. }
        | Query::Migration { vol }
        | Query::MigrationBlocks { vol, .. } => Some(*vol),
        _ => None,
    }
}

/// Splits `items` by the group of the slice id `id` gives for each, in order of group.
fn by_group<T>(items: &[T], id: impl Fn(&T) -> SliceId) -> Vec<(GroupId, Vec<T>)>
where
    T: Clone,
{
    let mut out: Vec<(GroupId, Vec<T>)> = Vec::new();
    for it in items {
        let g = group_of_slice(id(it));
        match out.iter_mut().find(|(x, _)| *x == g) {
            Some((_, v)) => v.push(it.clone()),
            None => out.push((g, vec![it.clone()])),
        }
    }
    out.sort_by_key(|(g, _)| *g);
    out
}

impl MetaClient {
    /// Whether this client routes: it is a control group client and the cluster has
    /// volumes in groups of their own.
    async fn routes(&self) -> Result<bool, ClientError> {
        if !self.routing() {
            return Ok(false);
        }
        Ok(!self.volume_group_list(false).await?.is_empty()
            || !self.volume_group_list(true).await?.is_empty())
    }

    /// The group of volume `vol` (the control group for one not in a group of its own).
    async fn group_of(&self, vol: VolumeId) -> Result<GroupId, ClientError> {
        Ok(self.for_volume(vol).await?.group())
    }

    pub(crate) async fn route_op(&self, op: &Op) -> Result<Route, ClientError> {
        if !self.routing() {
            return Ok(Route::Here);
        }
        if let Some(vol) = op_volume(op) {
            if !self.routes().await? {
                return Ok(Route::Here);
            }
            return Ok(Route::To(self.group_of(vol).await?));
        }
        // By slice id alone, whatever the list of groups says (it may be a moment old).
        let split = |parts: Vec<(GroupId, Op)>| match parts.as_slice() {
            [] => Route::Here,
            [(g, _)] => Route::To(*g),
            _ => Route::Split(parts),
        };
        Ok(match op {
            Op::ReplaceReplica { slice, .. } | Op::DropReplica { slice, .. } => {
                Route::To(group_of_slice(*slice))
            }
            Op::MarkTiered { store, blocks } => split(
                by_group(blocks, |b| b.0)
                    .into_iter()
                    .map(|(g, blocks)| (g, Op::MarkTiered { store: *store, blocks }))
                    .collect(),
            ),
            Op::ForgetSlices { ids } => split(
                by_group(ids, |id| *id).into_iter().map(|(g, ids)| (g, Op::ForgetSlices { ids })).collect(),
            ),
            Op::SpillInline { slices } => split(
                by_group(slices, |s| s.0)
                    .into_iter()
                    .map(|(g, slices)| (g, Op::SpillInline { slices }))
                    .collect(),
            ),
            _ => Route::Here,
        })
    }

    /// Answers `q` across groups when it must be; `None` when this client's group answers it
    /// alone.
    pub(crate) async fn route_query(&self, q: &Query) -> Result<Option<Reply>, ClientError> {
        if !self.routing() {
            return Ok(None);
        }
        // By slice id alone, whatever the list of groups says (it may be a moment old).
        let by_slice = |ids: &[SliceId]| ids.iter().any(|id| group_of_slice(*id) != DEFAULT_GROUP);
        let slice_query = match q {
            Query::SliceLocs { ids } | Query::SliceData { ids } => by_slice(ids),
            _ => false,
        };
        if !slice_query && !self.routes().await? {
            return Ok(None);
        }
        if let Some(vol) = query_volume(q) {
            let g = self.group_of(vol).await?;
            if g == DEFAULT_GROUP {
                return Ok(None);
            }
            return Ok(Some(Box::pin(self.for_group(g).query(q.clone())).await?));
        }
        match q {
            Query::VolumeByName { name } => {
                let list = self.volume_group_list(true).await?;
                match list.iter().find(|r| &r.name == name) {
                    Some(r) => Ok(Some(Box::pin(self.for_group(r.group).query(q.clone())).await?)),
                    None => Ok(None),
                }
            }
            Query::ListVolumes => {
                let mut all = self
                    .gather(q, |r| match r {
                        Reply::Volumes(v) => Ok(v),
                        other => Err(unexpected(&other)),
                    })
                    .await?;
                all.sort_by_key(|v| v.id);
                Ok(Some(Reply::Volumes(all)))
            }
            Query::Migrations => {
                let mut all = self
                    .gather(q, |r| match r {
                        Reply::Migrations(m) => Ok(m),
                        other => Err(unexpected(&other)),
                    })
                    .await?;
                all.sort_by_key(|m| m.job.vol);
                Ok(Some(Reply::Migrations(all)))
            }
            Query::SliceLocs { ids } => {
                let locs = self
                    .split(
                        ids,
                        |ids| Query::SliceLocs { ids },
                        |r| match r {
                            Reply::SliceLocs(l) => Ok(l),
                            other => Err(unexpected(&other)),
                        },
                    )
                    .await?;
                Ok(Some(Reply::SliceLocs(locs)))
            }
            Query::SliceData { ids } => {
                let data = self
                    .split(
                        ids,
                        |ids| Query::SliceData { ids },
                        |r| match r {
                            Reply::SliceData(d) => Ok(d),
                            other => Err(unexpected(&other)),
                        },
                    )
                    .await?;
                Ok(Some(Reply::SliceData(data)))
            }
            Query::StagedBlocks { after, limit } => {
                let (blocks, more) = self
                    .walk(
                        *after,
                        group_of_slice(after.0),
                        (0, 0),
                        *limit,
                        |after| Query::StagedBlocks { after, limit: *limit },
                        |r| match r {
                            Reply::Blocks { blocks, more } => Ok((blocks, more)),
                            other => Err(unexpected(&other)),
                        },
                    )
                    .await?;
                Ok(Some(Reply::Blocks { blocks, more }))
            }
            Query::PendingDeletes { after, limit } => {
                let (slices, more) = self
                    .walk(
                        *after,
                        group_of_slice(*after),
                        0,
                        *limit,
                        |after| Query::PendingDeletes { after, limit: *limit },
                        |r| match r {
                            Reply::Deletes { slices, more } => Ok((slices, more)),
                            other => Err(unexpected(&other)),
                        },
                    )
                    .await?;
                Ok(Some(Reply::Deletes { slices, more }))
            }
            Query::InlineSlices { after, limit } => {
                let (slices, more) = self
                    .walk(
                        *after,
                        group_of_slice(*after),
                        0,
                        *limit,
                        |after| Query::InlineSlices { after, limit: *limit },
                        |r| match r {
                            Reply::Inline { slices, more } => Ok((slices, more)),
                            other => Err(unexpected(&other)),
                        },
                    )
                    .await?;
                Ok(Some(Reply::Inline { slices, more }))
            }
            _ => Ok(None),
        }
    }

    /// A query about slices, split by the group each slice id names; the groups' answers
    /// (`answer` takes the items out of a reply),
    /// joined.
    /// `q` asked of every group (the control group first), the answers put together.
    async fn gather<T>(
        &self,
        q: &Query,
        answer: impl Fn(Reply) -> Result<Vec<T>, ClientError>,
    ) -> Result<Vec<T>, ClientError> {
        let mut out = Vec::new();
        for c in self.all_groups().await? {
            out.extend(answer(Box::pin(c.query_here(q.clone())).await?)?);
        }
        Ok(out)
    }

    async fn split<T>(
        &self,
        ids: &[SliceId],
        query: impl Fn(Vec<SliceId>) -> Query,
        answer: impl Fn(Reply) -> Result<Vec<T>, ClientError>,
    ) -> Result<Vec<T>, ClientError> {
        let mut out = Vec::new();
        for (g, ids) in by_group(ids, |id| *id) {
            let reply = Box::pin(self.for_group(g).query_here(query(ids))).await?;
            out.extend(answer(reply)?);
        }
        Ok(out)
    }

    /// One page of a list that every group keeps in slice-id order: from the group the
    /// cursor `after` is in (`first`), each group's page in turn (later groups from `start`,
    /// their beginning) until one has more or `limit` items are in. `answer` takes the items
    /// and the "more" flag out of a reply.
    async fn walk<T, C: Copy>(
        &self,
        after: C,
        first: GroupId,
        start: C,
        limit: u32,
        query: impl Fn(C) -> Query,
        answer: impl Fn(Reply) -> Result<(Vec<T>, bool), ClientError>,
    ) -> Result<(Vec<T>, bool), ClientError> {
        let mut out = Vec::new();
        let mut after = after;
        for g in self.groups_from(first).await? {
            let reply = Box::pin(self.for_group(g).query_here(query(after))).await?;
            let (items, more) = answer(reply)?;
            out.extend(items);
            if more || out.len() >= limit as usize {
                return Ok((out, true));
            }
            after = start;
        }
        Ok((out, false))
    }

    /// The control group and every volume group, by id, from `first` on (a paged list's
    /// cursor names the group it is in by its slice id).
    async fn groups_from(&self, first: GroupId) -> Result<Vec<GroupId>, ClientError> {
        let list = self.volume_group_list(true).await?;
        let mut ids: Vec<GroupId> =
            std::iter::once(DEFAULT_GROUP).chain(list.iter().map(|r| r.group)).collect();
        ids.sort_unstable();
        ids.dedup();
        Ok(ids.into_iter().filter(|g| *g >= first).collect())
    }
}

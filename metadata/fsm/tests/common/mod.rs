//! Test harness shared by the integration tests: a state machine with one volume and helpers
//! that apply commands with an advancing clock.
#![allow(dead_code)]

use elea_common::{Errno, Ino, SessionId, Timespec, VolumeId};
use elea_fsm::*;

pub const ROOT: Ino = 1;

pub struct H {
    pub sm: StateMachine,
    /// Seconds of the next command's time.
    pub t: i64,
    pub vol: VolumeId,
}

impl H {
    pub fn new() -> Self {
        let mut h = H { sm: StateMachine::new(), t: 1000, vol: 0 };
        match h.ok(Op::CreateVolume { name: "vol".into(), config: Default::default() }) {
            Reply::Volume(v) => h.vol = v.id,
            r => panic!("unexpected {r:?}"),
        }
        h
    }

    pub fn now(&self) -> Timespec {
        Timespec::new(self.t, 0)
    }

    pub fn command(&self, op: Op) -> Command {
        Command { client: 0, seq: 0, acked_below: 0, time: self.now(), op }
    }

    /// Apply `op` at the next second.
    pub fn apply(&mut self, op: Op) -> (OpResult, Vec<ChangeSet>) {
        self.t += 1;
        let c = self.command(op);
        self.sm.apply(&c)
    }

    pub fn ok(&mut self, op: Op) -> Reply {
        let dbg = format!("{op:?}");
        match self.apply(op).0 {
            Ok(r) => r,
            Err(e) => panic!("{dbg} failed: {e:?}"),
        }
    }

    /// Apply an op that must fail, and check it left the state untouched.
    pub fn err(&mut self, op: Op) -> Errno {
        let before = self.sm.snapshot();
        let dbg = format!("{op:?}");
        let (r, ch) = self.apply(op);
        let e = match r {
            Err(e) => e,
            Ok(r) => panic!("{dbg} succeeded: {r:?}"),
        };
        assert!(ch.is_empty(), "failed op emitted changes");
        assert_eq!(before, self.sm.snapshot(), "failed op {dbg} changed the state");
        e
    }

    pub fn q(&self, q: Query) -> OpResult {
        self.sm.query(&q)
    }

    pub fn mkdir(&mut self, parent: Ino, name: &str) -> Ino {
        let vol = self.vol;
        entry_ino(self.ok(Op::Mkdir {
            vol,
            parent,
            name: name.into(),
            mode: 0o755,
            uid: 1,
            gid: 1,
            ino: None,
        }))
    }

    pub fn mknod_op(&self, parent: Ino, name: &str) -> Op {
        Op::Mknod {
            vol: self.vol,
            parent,
            name: name.into(),
            mode: mode::S_IFREG | 0o644,
            uid: 1,
            gid: 1,
            rdev: 0,
            exclusive: true,
            ino: None,
            session: None,
        }
    }

    pub fn file(&mut self, parent: Ino, name: &str) -> Ino {
        let op = self.mknod_op(parent, name);
        entry_ino(self.ok(op))
    }

    pub fn attr(&self, ino: Ino) -> Attr {
        match self.q(Query::GetAttr { vol: self.vol, ino }) {
            Ok(Reply::Attr(a)) => a,
            r => panic!("getattr {ino}: {r:?}"),
        }
    }

    pub fn lookup(&self, parent: Ino, name: &str) -> Result<Ino, Errno> {
        match self.q(Query::Lookup { vol: self.vol, parent, name: name.into() }) {
            Ok(Reply::Entry { attr, .. }) => Ok(attr.ino),
            Ok(r) => panic!("lookup: {r:?}"),
            Err(e) => Err(e),
        }
    }

    pub fn session(&mut self, ttl_ms: u64) -> SessionId {
        match self.ok(Op::OpenSession { name: "s".into(), ttl_ms }) {
            Reply::Session { id, .. } => id,
            r => panic!("{r:?}"),
        }
    }

    pub fn names(&self, dir: Ino) -> Vec<String> {
        let mut out = Vec::new();
        let mut cookie = 0;
        loop {
            match self.q(Query::ReadDir { vol: self.vol, ino: dir, cookie, limit: 2, plus: false }) {
                Ok(Reply::Dir { entries, eof }) => {
                    for e in entries {
                        cookie = e.cookie;
                        out.push(String::from_utf8(e.name).unwrap());
                    }
                    if eof {
                        return out;
                    }
                }
                r => panic!("readdir: {r:?}"),
            }
        }
    }
}

pub fn entry_ino(r: Reply) -> Ino {
    match r {
        Reply::Entry { attr, .. } => attr.ino,
        r => panic!("not an entry: {r:?}"),
    }
}

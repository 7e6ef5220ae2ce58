//! The file system raft-engine writes its log through: its own, except that the space a log
//! file grows into is written with zeros instead of `fallocate`d.
//!
//! raft-engine extends the active log file 2 MiB at a time ahead of its writes. With
//! `fallocate` the new range is made of unwritten extents, and every later write into them
//! turns some into written extents: a file system metadata change, so each `fdatasync` of a
//! log append also commits the file system's journal. Over blocks that already hold data, an
//! `fdatasync` only has the data to write. On the ext4 disk of the machines Elea is benchmarked
//! on, that is 126 µs instead of 442 µs per small durable write (docs/BENCHMARKS.md), and
//! every commit of the metadata service waits for one or two of them.
//!
//! The file's contents are the same either way (zeros past the last record, which recovery
//! already handles after a crash); only the cost moves: 2 MiB of zeros written once per 2 MiB
//! of log, and flushed by the next sync.

use std::io::{Result, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use raft_engine::env::{DefaultFileSystem, FileSystem, Permission, WriteExt};

/// raft-engine's default file system with zero-filled allocation.
pub struct ZeroFillFs(DefaultFileSystem);

impl ZeroFillFs {
    pub fn new() -> Self {
        Self(DefaultFileSystem)
    }
}

impl Default for ZeroFillFs {
    fn default() -> Self {
        Self::new()
    }
}

type Inner = DefaultFileSystem;

/// A log file writer whose `allocate` writes zeros.
pub struct ZeroFillWriter(<Inner as FileSystem>::Writer);

/// Bytes of zeros written per call while filling.
const ZEROS: usize = 256 << 10;

impl Write for ZeroFillWriter {
    fn write(&mut self, buf: &[u8]) -> Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> Result<()> {
        self.0.flush()
    }
}

impl Seek for ZeroFillWriter {
    fn seek(&mut self, pos: SeekFrom) -> Result<u64> {
        self.0.seek(pos)
    }
}

impl WriteExt for ZeroFillWriter {
    fn truncate(&mut self, offset: usize) -> Result<()> {
        self.0.truncate(offset)
    }

    fn allocate(&mut self, offset: usize, size: usize) -> Result<()> {
        let pos = self.0.stream_position()?;
        self.0.seek(SeekFrom::Start(offset as u64))?;
        let zeros = vec![0u8; ZEROS.min(size)];
        let mut left = size;
        let mut res = Ok(());
        while left > 0 {
            let n = left.min(zeros.len());
            if let Err(e) = self.0.write_all(&zeros[..n]) {
                res = Err(e);
                break;
            }
            left -= n;
        }
        // The writer goes on where it was, whatever happened.
        self.0.seek(SeekFrom::Start(pos))?;
        res
    }
}

impl FileSystem for ZeroFillFs {
    type Handle = <Inner as FileSystem>::Handle;
    type Reader = <Inner as FileSystem>::Reader;
    type Writer = ZeroFillWriter;

    fn create<P: AsRef<Path>>(&self, path: P) -> Result<Self::Handle> {
        self.0.create(path)
    }

    fn open<P: AsRef<Path>>(&self, path: P, perm: Permission) -> Result<Self::Handle> {
        self.0.open(path, perm)
    }

    fn delete<P: AsRef<Path>>(&self, path: P) -> Result<()> {
        self.0.delete(path)
    }

    fn rename<P: AsRef<Path>>(&self, src_path: P, dst_path: P) -> Result<()> {
        self.0.rename(src_path, dst_path)
    }

    fn new_reader(&self, handle: Arc<Self::Handle>) -> Result<Self::Reader> {
        self.0.new_reader(handle)
    }

    fn new_writer(&self, handle: Arc<Self::Handle>) -> Result<Self::Writer> {
        self.0.new_writer(handle).map(ZeroFillWriter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft_engine::env::Handle as _;
    use std::io::Read as _;

    #[test]
    fn allocate_writes_zeros_and_keeps_the_write_position() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let fs = ZeroFillFs::new();
        let h = Arc::new(fs.create(&p).unwrap());
        let mut w = fs.new_writer(h.clone()).unwrap();
        w.write_all(b"head").unwrap();
        w.allocate(4, (1 << 20) + 3).unwrap();
        assert_eq!(h.file_size().unwrap(), 4 + (1 << 20) + 3);
        w.write_all(b"next").unwrap();
        h.sync().unwrap();
        let mut r = fs.new_reader(h).unwrap();
        let mut all = Vec::new();
        r.read_to_end(&mut all).unwrap();
        assert_eq!(&all[..8], b"headnext");
        assert!(all[8..].iter().all(|b| *b == 0));
        assert_eq!(all.len(), 4 + (1 << 20) + 3);
    }
}

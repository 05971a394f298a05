//! The direct data stream: large blob bodies between gateways and this shard over plain TCP,
//! never squeezed through NATS messages (see `docs/adr/0002-large-blobs-direct-stream.md`).
//!
//! Each connection carries a sequence of exchanges; each starts with a control frame
//! (`u32` little-endian length + codec frame of [`DataRequest`]) and is answered with
//! [`DataReply`] frames:
//! - `Read`: `ReadReady { len }`, then exactly `len` raw bytes (sent with `sendfile(2)`).
//! - `Write`: `WriteReady { committed }` (or `Committed` when the blob is already stored), then the
//!   client sends chunks (`u32` length + bytes) and a zero-length chunk to finish; the shard answers
//!   `Committed` or `Error`. A connection that drops mid-stream leaves the upload resumable.
//! - `Put`: the frame and then exactly the blob's bytes (at most [`DATA_PUT_MAX`]), sent at once;
//!   answered `Committed` or `Error` — one round trip for the small blobs builds upload most.
//!
//! One thread per connection: gateways pool their connections, so there are few, and blocking
//! I/O lets reads use `sendfile` and writes hash on a second core while the first writes. The
//! threads are bounded: at most [`MAX_CONNECTIONS`] connections are served, a connection past
//! that is answered with a RESOURCE_EXHAUSTED error and closed, and a peer that sends or takes
//! nothing for [`IO_TIMEOUT`] (a stalled write, an idle pooled connection) loses its connection
//! and frees its thread. Clients drop pooled connections idle for less than that.

use crate::store::{Store, StoreError, namespace};
use motorpool_messages::WireError;
use motorpool_messages::cas::{DATA_PUT_MAX, DataReply, DataRequest, data_socket_addr};
use motorpool_messages::codec;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Largest control frame accepted.
pub const MAX_CONTROL_FRAME: u32 = 64 * 1024;
/// Largest data chunk accepted in a write.
pub const MAX_CHUNK: u32 = 16 * 1024 * 1024;
/// Connections served at once (one thread each).
pub const MAX_CONNECTIONS: usize = 512;
/// A connection whose peer sends (or takes) nothing for this long is closed.
pub const IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
/// Data is handed to the file and the hasher in batches of about this size.
const BATCH: usize = 1 << 20;

/// Writes one control frame (in one `write`: replies go out as one packet).
pub fn write_frame<W: Write, M: motorpool_messages::Message>(w: &mut W, msg: &M) -> io::Result<()> {
    let frame = codec::encode(msg).map_err(io::Error::other)?;
    let mut out = Vec::with_capacity(4 + frame.len());
    out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
    out.extend_from_slice(&frame);
    w.write_all(&out)
}

/// Reads one control frame; `Ok(None)` on a clean end of stream before the frame.
pub fn read_frame<R: Read, M: motorpool_messages::Message>(r: &mut R) -> io::Result<Option<M>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_CONTROL_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("control frame of {len} bytes exceeds {MAX_CONTROL_FRAME}"),
        ));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    codec::decode(&buf)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The listening data stream of one shard.
#[derive(Debug)]
pub struct DataServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl DataServer {
    /// Binds and starts accepting: on TCP at `addr`, and at the abstract Unix socket address
    /// [`data_socket_addr`] of the bound address, where gateways on the same host's network
    /// connect without the TCP/IP stack in between (a best effort: without it, TCP serves all).
    ///
    /// With a `key`, a peer is served only after it proves it holds the key (a keyed hash of a
    /// fresh nonce, so a proof seen on the wire is worth nothing on another connection).
    pub fn start(
        addr: SocketAddr,
        store: Arc<Store>,
        key: Option<[u8; 32]>,
    ) -> io::Result<DataServer> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let local = match bind_local(addr) {
            Ok(l) => Some(l),
            Err(error) => {
                tracing::info!(%addr, %error, "Data stream on TCP only");
                None
            }
        };
        let open = Open::default();
        accept_loop(
            move || listener.accept(),
            stop.clone(),
            store.clone(),
            key,
            open.clone(),
        )?;
        if let Some(local) = local {
            accept_loop(move || local.accept(), stop.clone(), store, key, open)?;
        }
        Ok(DataServer { addr, stop })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting new connections (open ones finish their exchange).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
        let _ = connect_local(&self.addr.to_string());
    }
}

fn bind_local(addr: SocketAddr) -> io::Result<UnixListener> {
    UnixListener::bind_addr(&data_socket_addr(&addr.to_string())?)
}

/// Connects to the data stream a shard bound to `data_addr` serves at its abstract Unix socket
/// address; fails when no such shard is on this network namespace.
pub fn connect_local(data_addr: &str) -> io::Result<UnixStream> {
    UnixStream::connect_addr(&data_socket_addr(data_addr)?)
}

/// A connection the data stream is served on.
trait DataConnection: Read + Write + AsFd + Send + Sized + 'static {
    fn try_clone(&self) -> io::Result<Self>;
    /// Sets what the transport needs (TCP: replies are small and must not wait for more) and
    /// the I/O timeouts.
    fn tune(&self) -> io::Result<()>;
}

impl DataConnection for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn tune(&self) -> io::Result<()> {
        self.set_nodelay(true)?;
        self.set_read_timeout(Some(IO_TIMEOUT))?;
        self.set_write_timeout(Some(IO_TIMEOUT))
    }
}

impl DataConnection for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn tune(&self) -> io::Result<()> {
        self.set_read_timeout(Some(IO_TIMEOUT))?;
        self.set_write_timeout(Some(IO_TIMEOUT))
    }
}

/// Connections a data server is serving, across both its listeners.
type Open = Arc<std::sync::atomic::AtomicUsize>;

/// Holds a place among [`MAX_CONNECTIONS`] until dropped.
struct Place(Open);

impl Place {
    fn take(open: &Open) -> Option<Place> {
        let n = open.fetch_add(1, Ordering::AcqRel) + 1;
        if n > MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        metrics::gauge!(crate::metric_names::CAS_DATA_OPEN_CONNECTIONS).set(n as f64);
        Some(Place(open.clone()))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let n = self.0.fetch_sub(1, Ordering::AcqRel) - 1;
        metrics::gauge!(crate::metric_names::CAS_DATA_OPEN_CONNECTIONS).set(n as f64);
    }
}

/// Accepts connections on a thread of its own, each served on a thread of its own.
fn accept_loop<C: DataConnection, A>(
    mut accept: impl FnMut() -> io::Result<(C, A)> + Send + 'static,
    stop: Arc<AtomicBool>,
    store: Arc<Store>,
    key: Option<[u8; 32]>,
    open: Open,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("cas-data-accept".into())
        .spawn(move || {
            loop {
                let conn = accept();
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok((mut conn, _)) = conn else { continue };
                let Some(place) = Place::take(&open) else {
                    metrics::counter!(crate::metric_names::CAS_DATA_REFUSED_CONNECTIONS_TOTAL)
                        .increment(1);
                    let _ = conn.tune();
                    let busy = WireError::new(
                        motorpool_messages::ErrorCode::ResourceExhausted,
                        format!("the shard serves at most {MAX_CONNECTIONS} data connections"),
                    );
                    let _ = write_frame(&mut conn, &DataReply::Error(busy));
                    continue;
                };
                let store = store.clone();
                let _ = std::thread::Builder::new()
                    .name("cas-data-conn".into())
                    .spawn(move || {
                        let _place = place;
                        if let Err(error) = serve_connection(conn, &store, key.as_ref()) {
                            tracing::debug!(%error, "Data stream connection ended");
                        }
                    });
            }
        })?;
    Ok(())
}

fn serve_connection<C: DataConnection>(
    stream: C,
    store: &Store,
    key: Option<&[u8; 32]>,
) -> io::Result<()> {
    stream.tune()?;
    // Small: a write's chunks (up to a megabyte each from gateways) are read past it straight
    // into their batch, and only what the buffer already holds is copied.
    let mut reader = BufReader::with_capacity(64 * 1024, stream.try_clone()?);
    let mut writer = stream;
    // Who is there: every connection starts with the challenge and its answer.
    let nonce: [u8; 32] = rand::random();
    write_frame(&mut writer, &DataReply::Challenge { nonce })?;
    let proven = match read_frame::<_, DataRequest>(&mut reader)? {
        Some(DataRequest::Hello { proof }) => {
            // Constant-time: `blake3::Hash` compares that way.
            key.is_none()
                || blake3::Hash::from(proof)
                    == blake3::Hash::from(motorpool_messages::cas::data_proof(key, &nonce))
        }
        Some(_) => false,
        None => return Ok(()),
    };
    if !proven {
        metrics::counter!(crate::metric_names::CAS_DATA_UNAUTHENTICATED_TOTAL).increment(1);
        let e = WireError::new(
            motorpool_messages::ErrorCode::PermissionDenied,
            "the data stream serves only peers that hold the deployment's data key",
        );
        write_frame(&mut writer, &DataReply::Error(e))?;
        return Ok(());
    }
    let batches = BatchPool::default();
    loop {
        let Some(req) = read_frame::<_, DataRequest>(&mut reader)? else {
            return Ok(());
        };
        match req {
            DataRequest::Read {
                instance,
                digest,
                offset,
                limit,
            } => {
                if digest.is_empty_blob() {
                    if offset > 0 {
                        let e = WireError::invalid(format!(
                            "read offset {offset} is past the end of {digest}"
                        ));
                        write_frame(&mut writer, &DataReply::Error(e))?;
                    } else {
                        write_frame(&mut writer, &DataReply::ReadReady { len: 0 })?;
                    }
                    continue;
                }
                match store.open_read_or_fetch(namespace(&instance), &digest, offset, limit) {
                    Err(e) => write_frame(&mut writer, &DataReply::Error(e.into()))?,
                    Ok((file, len, _pin)) => {
                        write_frame(&mut writer, &DataReply::ReadReady { len })?;
                        let sent = send_file(&writer, &file, len)?;
                        metrics::counter!(crate::metric_names::CAS_SHARD_READ_BYTES_TOTAL)
                            .increment(sent);
                        if sent != len {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "blob file shorter than its digest",
                            ));
                        }
                    }
                }
            }
            DataRequest::Put { instance, digest } => {
                if digest.size > DATA_PUT_MAX {
                    let e = WireError::invalid(format!(
                        "{digest} is larger than the {DATA_PUT_MAX} bytes a put carries; stream it with a write"
                    ));
                    write_frame(&mut writer, &DataReply::Error(e))?;
                    // The announced bytes follow and are not worth reading: end the connection.
                    return Ok(());
                }
                let mut data = vec![0u8; digest.size as usize];
                // Cut short: the connection ends and nothing is stored.
                reader.read_exact(&mut data)?;
                let ns = store.namespace_of(&instance);
                let reply = match store.put(ns, &digest, &data) {
                    Ok(()) => {
                        metrics::counter!(crate::metric_names::CAS_SHARD_WRITTEN_BYTES_TOTAL)
                            .increment(digest.size);
                        DataReply::Committed { size: digest.size }
                    }
                    Err(e) => DataReply::Error(e.into()),
                };
                write_frame(&mut writer, &reply)?;
            }
            DataRequest::Hello { .. } => {
                let e = WireError::invalid("a connection says hello once, first");
                write_frame(&mut writer, &DataReply::Error(e))?;
                return Ok(());
            }
            DataRequest::Write {
                instance,
                digest,
                upload_id,
                offset,
            } => {
                let ns = store.namespace_of(&instance);
                let mut upload = match store.begin_upload(ns, &digest, &upload_id, offset) {
                    Err(e) => {
                        write_frame(&mut writer, &DataReply::Error(e.into()))?;
                        continue;
                    }
                    Ok(None) => {
                        write_frame(&mut writer, &DataReply::Committed { size: digest.size })?;
                        continue;
                    }
                    Ok(Some(u)) => u,
                };
                write_frame(
                    &mut writer,
                    &DataReply::WriteReady {
                        committed: upload.committed(),
                    },
                )?;
                let before = upload.committed();
                let mut finished = false;
                let appended = upload.append_pipelined(
                    ChunkReader {
                        r: &mut reader,
                        finished: &mut finished,
                        pool: &batches,
                    },
                    &|buf| batches.put(buf),
                );
                metrics::counter!(crate::metric_names::CAS_SHARD_WRITTEN_BYTES_TOTAL)
                    .increment(upload.committed() - before);
                let outcome = match appended {
                    // The stream ended without its finishing chunk: keep the upload for resumption.
                    Err(StoreError::Io { .. }) if !finished => return Ok(()),
                    Err(e) => Err(e),
                    Ok(()) if finished => upload.finish(),
                    Ok(()) => return Ok(()),
                };
                let reply = match outcome {
                    Ok(()) => DataReply::Committed { size: digest.size },
                    Err(e) => DataReply::Error(e.into()),
                };
                let mut w = BufWriter::new(&mut writer);
                write_frame(&mut w, &reply)?;
                w.flush()?;
                if !finished {
                    // The client may still be sending; this connection's framing is lost.
                    return Ok(());
                }
            }
        }
    }
}

/// Sends `len` bytes of `file` from its current position with `sendfile`: the page cache goes to
/// the socket without passing through this process. (`std::io::copy` of a `Take<File>` into a
/// socket falls back to 8 KiB reads and writes.) Returns the bytes sent; fewer than `len` when
/// the file ends early.
fn send_file(sock: impl AsFd, mut file: &std::fs::File, len: u64) -> io::Result<u64> {
    use std::io::Seek;
    let start = file.stream_position()?;
    let mut offset = i64::try_from(start).map_err(io::Error::other)?;
    let mut sent = 0u64;
    while sent < len {
        let n = (len - sent).min(1 << 30) as usize;
        match nix::sys::sendfile::sendfile64(&sock, file, Some(&mut offset), n) {
            Ok(0) => break,
            Ok(k) => sent += k as u64,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(sent)
}

/// A connection's batch buffers, handed back by the hasher: each is allocated, faulted in and
/// zeroed once, not for every megabyte of every write.
#[derive(Default)]
struct BatchPool(std::sync::Mutex<Vec<Vec<u8>>>);

impl BatchPool {
    /// The batches a write has in flight: the hasher's queue of two, the one being hashed and
    /// the one being read (more would sit idle, a megabyte each, for the connection's life).
    const KEEP: usize = 4;

    fn take(&self) -> Vec<u8> {
        let buf = self.0.lock().expect("batch pool").pop();
        buf.unwrap_or_else(|| Vec::with_capacity(BATCH + 64 * 1024))
    }

    fn put(&self, buf: Vec<u8>) {
        let mut free = self.0.lock().expect("batch pool");
        if free.len() < Self::KEEP && buf.capacity() <= 2 * BATCH {
            free.push(buf);
        }
    }
}

/// Yields the chunks of one write, batched to about [`BATCH`] bytes, until the zero-length chunk.
struct ChunkReader<'a, R> {
    r: &'a mut R,
    finished: &'a mut bool,
    pool: &'a BatchPool,
}

impl<R: Read> Iterator for ChunkReader<'_, R> {
    type Item = io::Result<Arc<Vec<u8>>>;

    fn next(&mut self) -> Option<Self::Item> {
        if *self.finished {
            return None;
        }
        // A recycled buffer keeps its length: bytes up to it are initialized (stale) and are
        // read over, so only a batch longer than any before it has a tail zeroed.
        let mut batch = self.pool.take();
        let mut filled = 0;
        while filled < BATCH {
            let mut len = [0u8; 4];
            if let Err(e) = self.r.read_exact(&mut len) {
                return Some(Err(e));
            }
            let len = u32::from_le_bytes(len);
            if len == 0 {
                *self.finished = true;
                break;
            }
            if len > MAX_CHUNK {
                return Some(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("chunk of {len} bytes exceeds {MAX_CHUNK}"),
                )));
            }
            let end = filled + len as usize;
            if batch.len() < end {
                batch.resize(end, 0);
            }
            if let Err(e) = self.r.read_exact(&mut batch[filled..end]) {
                return Some(Err(e));
            }
            filled = end;
        }
        batch.truncate(filled);
        if batch.is_empty() {
            self.pool.put(batch);
            None
        } else {
            Some(Ok(Arc::new(batch)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use motorpool_messages::{BlobDigest, DigestFunction, ErrorCode};
    use std::net::Shutdown;

    fn server() -> (tempfile::TempDir, Arc<Store>, DataServer) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 64 << 20, false).unwrap());
        let server =
            DataServer::start("127.0.0.1:0".parse().unwrap(), store.clone(), None).unwrap();
        (dir, store, server)
    }

    /// Answers the shard's challenge, as a client holding `key` does.
    fn hello<C: Read + Write>(mut conn: C, key: Option<&[u8; 32]>) -> C {
        let Some(DataReply::Challenge { nonce }) = read_frame(&mut conn).unwrap() else {
            panic!("a connection starts with the challenge");
        };
        let proof = motorpool_messages::cas::data_proof(key, &nonce);
        write_frame(&mut conn, &DataRequest::Hello { proof }).unwrap();
        conn
    }

    fn open(server: &DataServer) -> TcpStream {
        hello(TcpStream::connect(server.local_addr()).unwrap(), None)
    }

    #[test]
    fn a_shard_with_a_key_serves_only_peers_that_prove_they_hold_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 64 << 20, false).unwrap());
        let key = [7u8; 32];
        let server =
            DataServer::start("127.0.0.1:0".parse().unwrap(), store.clone(), Some(key)).unwrap();
        let body = b"keyed".to_vec();
        let d = DigestFunction::Sha256.digest_of(&body);
        for wrong in [None, Some(&[8u8; 32])] {
            let mut conn = hello(TcpStream::connect(server.local_addr()).unwrap(), wrong);
            match put(&mut conn, d, &body) {
                Ok(Some(DataReply::Error(e))) => {
                    assert_eq!(e.code, ErrorCode::PermissionDenied, "{e:?}")
                }
                other => panic!("an unproven peer got {other:?}"),
            }
        }
        // Skipping the hello is no way in either.
        let mut conn = TcpStream::connect(server.local_addr()).unwrap();
        let _: Option<DataReply> = read_frame(&mut conn).unwrap();
        assert!(!matches!(
            put(&mut conn, d, &body),
            Ok(Some(DataReply::Committed { .. }))
        ));
        assert!(!store.contains(namespace("main"), &d));
        // A proof from one connection is worth nothing on the next: nonces differ.
        let mut conn = hello(TcpStream::connect(server.local_addr()).unwrap(), Some(&key));
        assert!(matches!(
            put(&mut conn, d, &body),
            Ok(Some(DataReply::Committed { .. }))
        ));
    }

    /// Sends a put (frame and body together, as the client does) and reads the reply.
    fn put(
        conn: &mut (impl Read + Write),
        digest: BlobDigest,
        body: &[u8],
    ) -> io::Result<Option<DataReply>> {
        let req = DataRequest::Put {
            instance: "main".into(),
            digest,
        };
        let mut out = Vec::new();
        write_frame(&mut out, &req)?;
        out.extend_from_slice(body);
        conn.write_all(&out)?;
        read_frame(conn)
    }

    fn error_code(reply: Option<DataReply>) -> ErrorCode {
        match reply {
            Some(DataReply::Error(e)) => e.code,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    /// Streams one write as gateways do: chunks of `chunk` bytes, then the zero-length chunk.
    fn write(
        conn: &mut (impl Read + Write),
        digest: BlobDigest,
        body: &[u8],
        chunk: usize,
    ) -> DataReply {
        let req = DataRequest::Write {
            instance: "main".into(),
            digest,
            upload_id: format!("up-{}", digest.size),
            offset: 0,
        };
        write_frame(conn, &req).unwrap();
        let ready = read_frame::<_, DataReply>(conn).unwrap();
        assert_eq!(ready, Some(DataReply::WriteReady { committed: 0 }));
        let mut out = Vec::new();
        for c in body.chunks(chunk) {
            out.extend_from_slice(&(c.len() as u32).to_le_bytes());
            out.extend_from_slice(c);
        }
        out.extend_from_slice(&0u32.to_le_bytes());
        conn.write_all(&out).unwrap();
        read_frame(conn).unwrap().expect("a reply")
    }

    #[test]
    fn the_data_stream_is_served_at_its_abstract_unix_address_too() {
        let (_dir, store, server) = server();
        let ns = namespace("main");
        let addr = server.local_addr().to_string();
        let mut conn = hello(
            connect_local(&addr).expect("a shard on this network namespace"),
            None,
        );
        let body = b"over a unix socket".repeat(100);
        let d = DigestFunction::Sha256.digest_of(&body);
        assert_eq!(
            put(&mut conn, d, &body).unwrap(),
            Some(DataReply::Committed { size: d.size })
        );
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let db = DigestFunction::Sha256.digest_of(&big);
        assert_eq!(
            write(&mut conn, db, &big, 1 << 20),
            DataReply::Committed { size: db.size }
        );
        // A read comes back with sendfile over the same connection.
        write_frame(
            &mut conn,
            &DataRequest::Read {
                instance: "main".into(),
                digest: db,
                offset: 0,
                limit: 0,
            },
        )
        .unwrap();
        assert_eq!(
            read_frame::<_, DataReply>(&mut conn).unwrap(),
            Some(DataReply::ReadReady { len: db.size })
        );
        let mut back = vec![0u8; big.len()];
        conn.read_exact(&mut back).unwrap();
        assert_eq!(back, big);
        assert_eq!(store.read(ns, &d, 0, 0).unwrap(), body);

        // Another address has no shard behind it; a stopped shard gives its address up.
        assert!(connect_local("127.0.0.1:1").is_err());
        server.stop();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while connect_local(&addr).is_ok() {
            assert!(std::time::Instant::now() < deadline, "{addr} still served");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn writes_on_one_connection_reuse_batches_without_mixing_their_bytes() {
        let (_dir, store, server) = server();
        let ns = namespace("main");
        let mut conn = open(&server);
        // Each blob is shorter than the one before, in differently sized chunks, so a batch
        // buffer handed back by the hasher still holds the previous write's bytes past the end
        // of the new ones.
        for (i, (len, chunk)) in [
            (5 << 20, 1 << 20),
            (3 << 20, 300_000),
            (1_500_000, 16 << 10),
        ]
        .into_iter()
        .enumerate()
        {
            let body: Vec<u8> = (0..len).map(|j| (j * 7 + i * 13) as u8).collect();
            let d = DigestFunction::Sha256.digest_of(&body);
            assert_eq!(
                write(&mut conn, d, &body, chunk),
                DataReply::Committed { size: d.size }
            );
            assert_eq!(store.read(ns, &d, 0, 0).unwrap(), body);
        }
        server.stop();
    }

    #[test]
    fn puts_store_whole_blobs_in_one_round_trip_and_refuse_bad_ones() {
        let (_dir, store, server) = server();
        let ns = namespace("main");
        let mut conn = open(&server);

        let body = b"#include <vector>\n".repeat(40);
        let d = DigestFunction::Sha256.digest_of(&body);
        assert_eq!(
            put(&mut conn, d, &body).unwrap(),
            Some(DataReply::Committed { size: d.size })
        );
        assert_eq!(store.read(ns, &d, 0, 0).unwrap(), body);
        // Again: already stored, still committed.
        assert_eq!(
            put(&mut conn, d, &body).unwrap(),
            Some(DataReply::Committed { size: d.size })
        );

        // Bytes that do not hash to the digest: refused, nothing stored, the connection goes on.
        let mut forged = d;
        forged.hash[0] ^= 1;
        assert_eq!(
            error_code(put(&mut conn, forged, &body).unwrap()),
            ErrorCode::InvalidArgument
        );
        assert!(!store.contains(ns, &forged));
        let empty = DigestFunction::Sha256.digest_of(b"");
        assert_eq!(
            put(&mut conn, empty, b"").unwrap(),
            Some(DataReply::Committed { size: 0 })
        );

        // Larger than a put may carry: refused before its bytes are read, and the connection
        // (whose framing those bytes would break) is closed.
        let mut big = DigestFunction::Sha256.digest_of(b"big");
        big.size = DATA_PUT_MAX + 1;
        let mut conn2 = open(&server);
        assert_eq!(
            error_code(put(&mut conn2, big, b"").unwrap()),
            ErrorCode::InvalidArgument
        );
        assert!(read_frame::<_, DataReply>(&mut conn2).unwrap().is_none());

        // Cut inside the body: nothing is stored, and the shard keeps serving.
        let cut = b"truncated upload body".repeat(10);
        let dc = DigestFunction::Sha256.digest_of(&cut);
        let mut conn3 = open(&server);
        let mut out = Vec::new();
        write_frame(
            &mut out,
            &DataRequest::Put {
                instance: "main".into(),
                digest: dc,
            },
        )
        .unwrap();
        out.extend_from_slice(&cut[..cut.len() / 2]);
        conn3.write_all(&out).unwrap();
        conn3.shutdown(Shutdown::Write).unwrap();
        assert!(read_frame::<_, DataReply>(&mut conn3).unwrap().is_none());
        assert!(!store.contains(ns, &dc));
        assert_eq!(
            put(&mut conn, dc, &cut).unwrap(),
            Some(DataReply::Committed { size: dc.size })
        );
        server.stop();
    }
}

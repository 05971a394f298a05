//! The direct data stream: large blob bodies between gateways and this shard over plain TCP,
//! never squeezed through NATS messages (see `docs/adr/0002-large-blobs-direct-stream.md`).
//!
//! Each connection carries a sequence of exchanges; each starts with a control frame
//! (`u32` little-endian length + codec frame of [`DataRequest`]) and is answered with
//! [`DataReply`] frames:
//! - `Read`: `ReadReady { len }`, then exactly `len` raw bytes (sent with `sendfile`).
//! - `Write`: `WriteReady { committed }` (or `Committed` when the blob is already stored), then the
//!   client sends chunks (`u32` length + bytes) and a zero-length chunk to finish; the shard answers
//!   `Committed` or `Error`. A connection that drops mid-stream leaves the upload resumable.
//!
//! One thread per connection: gateways pool their connections, so there are few, and blocking
//! I/O lets reads use `sendfile` and writes hash on a second core while the first writes.

use crate::store::{Store, StoreError, namespace};
use motorpool_messages::WireError;
use motorpool_messages::cas::{DataReply, DataRequest};
use motorpool_messages::codec;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Largest control frame accepted.
pub const MAX_CONTROL_FRAME: u32 = 64 * 1024;
/// Largest data chunk accepted in a write.
pub const MAX_CHUNK: u32 = 16 * 1024 * 1024;
/// Data is handed to the file and the hasher in batches of about this size.
const BATCH: usize = 1 << 20;

/// Writes one control frame.
pub fn write_frame<W: Write, M: motorpool_messages::Message>(w: &mut W, msg: &M) -> io::Result<()> {
    let frame = codec::encode(msg).map_err(io::Error::other)?;
    w.write_all(&(frame.len() as u32).to_le_bytes())?;
    w.write_all(&frame)
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
    /// Binds and starts accepting.
    pub fn start(addr: SocketAddr, store: Arc<Store>) -> io::Result<DataServer> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("cas-data-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let store = store.clone();
                    let _ = std::thread::Builder::new()
                        .name("cas-data-conn".into())
                        .spawn(move || {
                            let peer = conn.peer_addr().ok();
                            if let Err(error) = serve_connection(conn, &store) {
                                tracing::debug!(?peer, %error, "Data stream connection ended");
                            }
                        });
                }
            })?;
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
    }
}

fn serve_connection(stream: TcpStream, store: &Store) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::with_capacity(256 * 1024, stream.try_clone()?);
    let mut writer = stream;
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
                match store.open_read(namespace(&instance), &digest, offset, limit) {
                    Err(e) => write_frame(&mut writer, &DataReply::Error(e.into()))?,
                    Ok((file, len, _pin)) => {
                        write_frame(&mut writer, &DataReply::ReadReady { len })?;
                        // std's copy uses sendfile/splice between a file and a socket.
                        let sent = io::copy(&mut file.take(len), &mut writer)?;
                        metrics::counter!("motorpool_cas_shard_read_bytes_total").increment(sent);
                        if sent != len {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "blob file shorter than its digest",
                            ));
                        }
                    }
                }
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
                let appended = upload.append_pipelined(ChunkReader {
                    r: &mut reader,
                    finished: &mut finished,
                });
                metrics::counter!("motorpool_cas_shard_written_bytes_total")
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

/// Yields the chunks of one write, batched to about [`BATCH`] bytes, until the zero-length chunk.
struct ChunkReader<'a, R> {
    r: &'a mut R,
    finished: &'a mut bool,
}

impl<R: Read> Iterator for ChunkReader<'_, R> {
    type Item = io::Result<Arc<Vec<u8>>>;

    fn next(&mut self) -> Option<Self::Item> {
        if *self.finished {
            return None;
        }
        let mut batch: Vec<u8> = Vec::with_capacity(BATCH + 64 * 1024);
        while batch.len() < BATCH {
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
            let start = batch.len();
            batch.resize(start + len as usize, 0);
            if let Err(e) = self.r.read_exact(&mut batch[start..]) {
                return Some(Err(e));
            }
        }
        if batch.is_empty() {
            None
        } else {
            Some(Ok(Arc::new(batch)))
        }
    }
}

//! Wire framing of sync messages: length-prefixed frames (u32 LE), capped
//! at `net.max_message_bytes`, as written on the long-lived frame streams
//! (`link.rs`) and as the requests of the request-response fallback
//! (`/mergeflow/sync/1`, whose responses are empty frames).

use std::io;

use libp2p::StreamProtocol;
use libp2p::futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::request_response;

/// The request-response protocol of sync frames.
pub(super) const PROTOCOL: StreamProtocol = StreamProtocol::new("/mergeflow/sync/1");

/// Length-prefixed frames (u32 LE), capped: requests carry one encoded sync
/// message, responses are empty.
#[derive(Clone)]
pub(super) struct SyncCodec {
    /// Largest frame taken, in bytes.
    pub(super) max: usize,
}

/// Reads one frame of at most `max` bytes.
pub(super) async fn read_frame<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    max: usize,
) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds net.max_message_bytes = {max}"),
        ));
    }
    // Grow the buffer as bytes arrive: a length header alone must not make us
    // allocate up to the cap.
    let mut buf = Vec::with_capacity(len.min(64 * 1024));
    io.take(len as u64).read_to_end(&mut buf).await?;
    if buf.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "frame ends early",
        ));
    }
    Ok(buf)
}

/// Appends `data` to `out` as one frame: its length (u32 LE), then itself.
pub(super) fn put_frame(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, data: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(4 + data.len());
    put_frame(&mut buf, data);
    io.write_all(&buf).await?;
    io.close().await
}

impl request_response::Codec for SyncCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = ();

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        read_frame(io, self.max).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<()> {
        read_frame(io, 0).await.map(|_| ())
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()> {
        write_frame(io, &req).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        (): (),
    ) -> io::Result<()> {
        write_frame(io, &[]).await
    }
}

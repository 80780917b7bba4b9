//! The raw-bytes request/response protocol that carries tensors between a coordinator
//! and its nodes on the same libp2p swarm as kameo's remote actors.
//!
//! A message is a `u32` little-endian length followed by that many bytes, read straight
//! into one buffer: no per-element encoding, so a tensor of `n` f32 values costs `4n + 4`
//! bytes before noise and yamux framing. The message bytes themselves (the branch step
//! protocol) carry their own version and checksum.

use std::io;

use futures::{AsyncReadExt, AsyncWriteExt, prelude::*};
use libp2p::StreamProtocol;
use libp2p::request_response::Codec;

/// The protocol name negotiated on each stream.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/mbtd/branch/1");

/// Length-prefixed byte messages, each at most `max_bytes`.
#[derive(Clone, Copy, Debug)]
pub struct RawCodec {
    pub max_bytes: usize,
}

impl RawCodec {
    async fn read<T: AsyncRead + Unpin + Send>(&self, io: &mut T) -> io::Result<Vec<u8>> {
        let mut len = [0u8; 4];
        io.read_exact(&mut len).await?;
        let n = u32::from_le_bytes(len) as usize;
        if n > self.max_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "message of {n} bytes exceeds cluster.max_message_bytes = {}",
                    self.max_bytes
                ),
            ));
        }
        let mut buf = vec![0u8; n];
        io.read_exact(&mut buf).await?;
        Ok(buf)
    }

    async fn write<T: AsyncWrite + Unpin + Send>(
        &self,
        io: &mut T,
        msg: Vec<u8>,
    ) -> io::Result<()> {
        let n = u32::try_from(msg.len())
            .ok()
            .filter(|&n| n as usize <= self.max_bytes)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "message of {} bytes exceeds cluster.max_message_bytes = {}",
                        msg.len(),
                        self.max_bytes
                    ),
                )
            })?;
        io.write_all(&n.to_le_bytes()).await?;
        io.write_all(&msg).await?;
        io.close().await
    }
}

#[async_trait::async_trait]
impl Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        self.read(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        self.read(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        self.write(io, req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        self.write(io, res).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    #[test]
    fn a_message_round_trips_and_an_oversized_one_is_refused() {
        futures::executor::block_on(async {
            let codec = RawCodec { max_bytes: 64 };
            let mut wire = Cursor::new(Vec::new());
            codec.write(&mut wire, vec![7u8; 64]).await.unwrap();
            assert_eq!(wire.get_ref().len(), 68);
            wire.set_position(0);
            assert_eq!(codec.read(&mut wire).await.unwrap(), vec![7u8; 64]);
            let mut wire = Cursor::new(Vec::new());
            assert!(codec.write(&mut wire, vec![0u8; 65]).await.is_err());
            let mut big = Cursor::new([65u32.to_le_bytes().to_vec(), vec![0; 65]].concat());
            let err = codec.read(&mut big).await.unwrap_err();
            assert!(err.to_string().contains("max_message_bytes"), "{err}");
        });
    }
}

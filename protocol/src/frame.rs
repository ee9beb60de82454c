//! Frames: a u32 little-endian length, then one encoded prost message.
//!
//! Used for the control stream and the first frame of every file stream. The length is checked against
//! [`MAX_FRAME`] before any buffer is allocated, so a hostile peer cannot make us allocate more.

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::ProtocolError;

/// Largest control frame. The biggest legitimate message is ImagesDone with a few thousand file
/// summaries (about 40 bytes each), far below this.
pub const MAX_FRAME: usize = 1 << 20;

/// Writes one frame.
///
/// # Cancel safety
/// Not cancel safe: a cancelled write may leave half a frame on the stream.
pub async fn write_frame<W: AsyncWrite + Unpin, M: Message>(w: &mut W, msg: &M) -> Result<(), ProtocolError> {
    let len = msg.encoded_len();
    if len > MAX_FRAME {
        return Err(ProtocolError::FrameTooLarge { len, max: MAX_FRAME });
    }
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&u32::try_from(len).expect("checked above").to_le_bytes());
    msg.encode(&mut buf).expect("Vec grows as needed");
    w.write_all(&buf).await?;
    Ok(())
}

/// Reads one frame. `Ok(None)` means the peer finished the stream cleanly between frames.
///
/// # Cancel safety
/// Not cancel safe: a cancelled read may have consumed part of a frame.
pub async fn read_frame<R: AsyncRead + Unpin, M: Message + Default>(r: &mut R) -> Result<Option<M>, ProtocolError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len[got..]).await?;
        if n == 0 {
            return if got == 0 { Ok(None) } else { Err(ProtocolError::Truncated) };
        }
        got += n;
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::FrameTooLarge { len, max: MAX_FRAME });
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtocolError::Truncated,
        _ => ProtocolError::Io(e),
    })?;
    Ok(Some(M::decode(buf.as_slice())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    #[tokio::test]
    async fn round_trip_and_clean_eof() {
        let msg =
            pb::Prepare { migration_id: "m1".into(), pids: vec![1, 2, 3], comm: "sleep".into(), ..Default::default() };
        let mut buf = Vec::new();
        write_frame(&mut buf, &msg).await.unwrap();
        let mut r = buf.as_slice();
        let back: pb::Prepare = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!(back, msg);
        assert!(read_frame::<_, pb::Prepare>(&mut r).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_allocating() {
        let buf = u32::MAX.to_le_bytes();
        let err = read_frame::<_, pb::Prepare>(&mut buf.as_slice()).await.unwrap_err();
        assert!(matches!(err, ProtocolError::FrameTooLarge { len, .. } if len == u32::MAX as usize), "{err}");
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error() {
        let msg = pb::Abort { reason: "x".repeat(100) };
        let mut buf = Vec::new();
        write_frame(&mut buf, &msg).await.unwrap();
        buf.truncate(50);
        let err = read_frame::<_, pb::Abort>(&mut buf.as_slice()).await.unwrap_err();
        assert!(matches!(err, ProtocolError::Truncated), "{err}");
        let err = read_frame::<_, pb::Abort>(&mut &buf[..2]).await.unwrap_err();
        assert!(matches!(err, ProtocolError::Truncated), "{err}");
    }

    #[tokio::test]
    async fn garbage_is_a_decode_error() {
        let mut buf = 4u32.to_le_bytes().to_vec();
        buf.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        let err = read_frame::<_, pb::SourceMsg>(&mut buf.as_slice()).await.unwrap_err();
        assert!(matches!(err, ProtocolError::Decode(_)), "{err}");
    }
}

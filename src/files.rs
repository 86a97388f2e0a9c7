//! Reading operator-supplied files safely: only regular files, opened without blocking (a FIFO
//! with no writer would otherwise hang the reader), and never more than a stated size (a
//! secret pointing at `/dev/zero` would otherwise be read until the kernel kills the process).

use std::fs::File;
use std::io::Read;
use std::path::Path;

/// A secret file holds at most this much.
pub const SECRET_MAX_BYTES: u64 = 4096;
/// A config file or CA bundle holds at most this much.
pub const CONFIG_MAX_BYTES: u64 = 1024 * 1024;

/// Why a file was refused.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("is not a regular file ({0}); refusing to read it")]
    NotRegular(&'static str),
    #[error("is larger than {0} bytes; refusing to read it")]
    TooLarge(u64),
}

/// Opens `path` for reading if it is a regular file, without blocking on FIFOs or devices.
pub fn open_regular(path: &Path) -> Result<File, FileError> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = options.open(path)?;
    let kind = file.metadata()?.file_type();
    if kind.is_file() {
        return Ok(file);
    }
    Err(FileError::NotRegular(describe(&kind)))
}

/// Reads a whole regular file of at most `max` bytes.
pub fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>, FileError> {
    let file = open_regular(path)?;
    let mut bytes = Vec::new();
    // One byte more than allowed tells "too large" apart from "exactly max".
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(FileError::TooLarge(max));
    }
    Ok(bytes)
}

fn describe(kind: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return "a FIFO";
        }
        if kind.is_char_device() || kind.is_block_device() {
            return "a device";
        }
        if kind.is_socket() {
            return "a socket";
        }
    }
    if kind.is_dir() {
        "a directory"
    } else {
        "not a file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_fifos_directories_and_large_files_are_refused_at_once() {
        let dir = std::env::temp_dir().join(format!("gap-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = read_capped(Path::new("/dev/zero"), 4096).unwrap_err();
        assert!(e.to_string().contains("a device"), "{e}");
        let e = read_capped(&dir, 4096).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
        let fifo = dir.join("fifo");
        let _ = std::fs::remove_file(&fifo);
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            // No writer: a blocking open would hang here forever.
            let e = read_capped(&fifo, 4096).unwrap_err();
            assert!(e.to_string().contains("FIFO"), "{e}");
        }
        let big = dir.join("big");
        std::fs::write(&big, vec![b'x'; 5000]).unwrap();
        assert!(matches!(
            read_capped(&big, 4096),
            Err(FileError::TooLarge(4096))
        ));
        std::fs::write(&big, vec![b'x'; 4096]).unwrap();
        assert_eq!(read_capped(&big, 4096).unwrap().len(), 4096);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

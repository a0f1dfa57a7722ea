//! Two raw bpf(2) calls aya 0.14 does not expose for cgroup/getsockopt: its link type has no
//! conversion to `FdLink`, so the link cannot be pinned through aya and would vanish with the
//! loading process. Everything else goes through aya.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
pub const BPF_CGROUP_GETSOCKOPT: u32 = 21;

/// `union bpf_attr` is larger than any field we set; the kernel wants the rest zeroed.
#[repr(C, align(8))]
struct Attr([u8; 128]);

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, zero-initialised bpf_attr buffer of the size we pass.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut Attr, std::mem::size_of::<Attr>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `BPF_LINK_CREATE` attaching `prog` to the cgroup `target`.
pub fn link_create(prog: BorrowedFd<'_>, target: BorrowedFd<'_>, attach_type: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr([0; 128]);
    attr.0[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr.0[4..8].copy_from_slice(&(target.as_raw_fd() as u32).to_ne_bytes());
    attr.0[8..12].copy_from_slice(&attach_type.to_ne_bytes());
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_PIN` of any bpf object fd at `path` on a bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path =
        CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = Attr([0; 128]);
    attr.0[0..8].copy_from_slice(&(c_path.as_ptr() as u64).to_ne_bytes());
    attr.0[8..12].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    bpf(BPF_OBJ_PIN, &mut attr)?;
    Ok(())
}

/// The network namespace cookie of the calling thread's namespace (`SO_NETNS_COOKIE`).
pub fn current_netns_cookie() -> io::Result<u64> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    socket_netns_cookie(sock.as_raw_fd())
}

/// `SO_NETNS_COOKIE` of a socket: keys of per-netns map entries carry it.
pub fn socket_netns_cookie(fd: i32) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len point to valid storage of the sizes given.
    let ret = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE, &mut cookie as *mut u64 as *mut libc::c_void, &mut len)
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The netns cookie of the namespace at `ns_path`, read from a helper thread that enters it.
pub fn netns_cookie_of(ns_path: &Path) -> io::Result<u64> {
    let file = std::fs::File::open(ns_path)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this helper thread only; the thread ends right after.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            current_netns_cookie()
        })
        .join()
        .map_err(|_| io::Error::other("netns helper thread panicked"))?
    })
}

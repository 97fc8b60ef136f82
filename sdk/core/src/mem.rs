//! Page-backed memory for large, long-lived buffers (KV cache pools, bandwidth probes).

/// Buffers of at least this many bytes are aligned to, and advised as, 2 MiB transparent
/// huge pages.
pub const HUGE_PAGE: usize = 2 << 20;

pub use imp::PageBuffer;

#[cfg(target_os = "linux")]
mod imp {
    use super::HUGE_PAGE;
    use std::ptr::NonNull;

    /// A zeroed byte buffer that is an anonymous mapping of its own: pages are committed
    /// only when written, and buffers of [`HUGE_PAGE`] bytes or more are aligned to 2 MiB
    /// and advised as transparent huge pages before the first write (a heap allocation may
    /// already have been touched, and then stays on 4 KiB pages).
    pub struct PageBuffer {
        ptr: NonNull<u8>,
        len: usize,
        /// Bytes mapped at `ptr` (`len` rounded up to whole pages or huge pages).
        mapped: usize,
    }

    // SAFETY: a `PageBuffer` owns its mapping exclusively, like a `Vec<u8>`; `&self` only
    // reads.
    unsafe impl Send for PageBuffer {}
    // SAFETY: as above.
    unsafe impl Sync for PageBuffer {}

    fn map(len: usize) -> *mut u8 {
        // SAFETY: asks for a fresh private anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let layout = std::alloc::Layout::from_size_align(len, 64).expect("slab layout");
            std::alloc::handle_alloc_error(layout);
        }
        p as *mut u8
    }

    impl PageBuffer {
        pub fn zeroed(len: usize) -> Self {
            if len == 0 {
                return PageBuffer {
                    ptr: NonNull::dangling(),
                    len: 0,
                    mapped: 0,
                };
            }
            let (start, mapped) = if len >= HUGE_PAGE {
                // Map one huge page more than needed, keep the 2 MiB aligned part, unmap
                // the rest (both cut points are page aligned).
                let mapped = len.next_multiple_of(HUGE_PAGE);
                let p = map(mapped + HUGE_PAGE) as usize;
                let start = p.next_multiple_of(HUGE_PAGE);
                let end = p + mapped + HUGE_PAGE;
                // SAFETY: both ranges lie inside the mapping just made and hold nothing.
                // MADV_HUGEPAGE only changes how the kernel backs the range; if it fails
                // (huge pages disabled) the range keeps ordinary pages.
                unsafe {
                    if start > p {
                        libc::munmap(p as *mut libc::c_void, start - p);
                    }
                    if end > start + mapped {
                        libc::munmap((start + mapped) as *mut libc::c_void, end - start - mapped);
                    }
                    libc::madvise(start as *mut libc::c_void, mapped, libc::MADV_HUGEPAGE);
                }
                (start as *mut u8, mapped)
            } else {
                (map(len), len)
            };
            PageBuffer {
                ptr: NonNull::new(start).expect("mmap returned null"),
                len,
                mapped,
            }
        }
        #[inline]
        pub fn bytes(&self) -> &[u8] {
            // SAFETY: `ptr` maps at least `len` readable bytes for the slab's lifetime.
            unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
        }
        #[inline]
        pub fn bytes_mut(&mut self) -> &mut [u8] {
            // SAFETY: as above; `&mut self` makes the access exclusive.
            unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
        }
    }

    impl Drop for PageBuffer {
        fn drop(&mut self) {
            if self.mapped > 0 {
                // SAFETY: the mapping of `mapped` bytes at `ptr` is ours and unused from now.
                unsafe {
                    libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.mapped);
                }
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    /// A zeroed byte buffer (heap-allocated, 8-byte aligned, on systems without the Linux
    /// mapping path).
    pub struct PageBuffer {
        words: Vec<u64>,
        len: usize,
    }
    impl PageBuffer {
        pub fn zeroed(len: usize) -> Self {
            PageBuffer {
                words: vec![0u64; len.div_ceil(8)],
                len,
            }
        }
        pub fn bytes(&self) -> &[u8] {
            &bytemuck::cast_slice(&self.words)[..self.len]
        }
        pub fn bytes_mut(&mut self) -> &mut [u8] {
            &mut bytemuck::cast_slice_mut(&mut self.words)[..self.len]
        }
    }
}

impl PageBuffer {
    /// The buffer as 64-bit words (a trailing partial word is left out).
    pub fn words(&self) -> &[u64] {
        let b = self.bytes();
        bytemuck::cast_slice(&b[..b.len() / 8 * 8])
    }
    /// The buffer as mutable 64-bit words (a trailing partial word is left out).
    pub fn words_mut(&mut self) -> &mut [u64] {
        let b = self.bytes_mut();
        let n = b.len() / 8 * 8;
        bytemuck::cast_slice_mut(&mut b[..n])
    }
}

impl Clone for PageBuffer {
    /// A fresh buffer (its own mapping, advised the same way) with the same bytes.
    fn clone(&self) -> Self {
        let mut d = PageBuffer::zeroed(self.bytes().len());
        d.bytes_mut().copy_from_slice(self.bytes());
        d
    }
}

impl std::fmt::Debug for PageBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageBuffer({} bytes)", self.bytes().len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_aligned_and_writable() {
        for len in [0, 1, 100, 4096, HUGE_PAGE, HUGE_PAGE + 12345] {
            let mut b = PageBuffer::zeroed(len);
            assert_eq!(b.bytes().len(), len);
            assert!(b.bytes().iter().all(|&x| x == 0));
            if len > 0 {
                assert_eq!(b.bytes().as_ptr() as usize % 8, 0);
                b.bytes_mut()[len - 1] = 7;
                assert_eq!(b.bytes()[len - 1], 7);
                let c = b.clone();
                assert_eq!(c.bytes(), b.bytes());
                assert_ne!(c.bytes().as_ptr(), b.bytes().as_ptr());
            }
            if len >= HUGE_PAGE {
                assert_eq!(b.bytes().as_ptr() as usize % HUGE_PAGE, 0);
            }
        }
    }
}

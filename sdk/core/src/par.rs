//! Work sharing for the short parallel regions of a decode step.
//!
//! A decoded token is a chain of about five dependent parallel regions per layer (the
//! matrix-vector products and attention), each a few to a few tens of microseconds long.
//! Through rayon, each region pays a fork and a join: the pool's other threads wait for
//! work in an idle loop that yields to the kernel, so a region starts on the second thread
//! about a microsecond late (0.6-1.2 us, measured in `bench decode`) and ends with the
//! first thread waiting for it again, against regions of 5-30 us.
//!
//! [`with_team`] holds the pool's other threads for the length of a run of such regions
//! (one decode step): they spin on a shared generation counter instead of returning to the
//! pool, so [`for_each_mut`] hands them a region in well under a microsecond. Each thread
//! takes a contiguous run of the region's items in order (it streams its share of the
//! weights front to back) and then claims what is left of the others' from the back, so
//! the threads finish together and a thread that joins late just takes less. Outside a
//! team [`for_each_mut`] is rayon's `par_iter_mut`.

use rayon::prelude::*;
use std::cell::Cell;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

/// Busy-wait rounds before a waiting team thread starts yielding its core (a pool larger
/// than the machine's cores must not starve the thread it waits for).
const SPINS_BEFORE_YIELD: u32 = 1 << 11;

/// The threads of a [`with_team`] call and the region they work on.
struct Team {
    /// Bumped for each published region (helpers watch it).
    generation: AtomicUsize,
    /// The published region's participant function (a `*const &dyn Fn()`), or null once
    /// its leader stops taking helpers.
    job: AtomicPtr<()>,
    /// Helpers inside the current region's function.
    active: AtomicUsize,
    stop: AtomicBool,
    leader: std::thread::ThreadId,
}

thread_local! {
    /// The team this thread leads, while [`with_team`] runs on it.
    static LEADS: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
}

/// Runs `f` with the current rayon pool's other threads held as a team (see the module
/// documentation): [`for_each_mut`] calls made by `f` on this thread run on the team. On
/// one thread, outside a pool, or inside another team, just runs `f`.
pub fn with_team<R>(f: impl FnOnce() -> R) -> R {
    let threads = rayon::current_num_threads();
    if threads <= 1 || rayon::current_thread_index().is_none() || !LEADS.get().is_null() {
        return f();
    }
    let team = Team {
        generation: AtomicUsize::new(0),
        job: AtomicPtr::new(std::ptr::null_mut()),
        active: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        leader: std::thread::current().id(),
    };
    rayon::in_place_scope(|s| {
        for _ in 1..threads {
            s.spawn(|_| help(&team));
        }
        // Clears the leadership and releases the helpers even if `f` panics.
        struct Release<'t>(&'t Team);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                LEADS.set(std::ptr::null());
                self.0.stop.store(true, Ordering::Release);
            }
        }
        LEADS.set(&team);
        let _release = Release(&team);
        f()
    })
}

/// Whether this thread leads a team ([`with_team`]): its [`for_each_mut`] calls run on it.
pub fn in_team() -> bool {
    !LEADS.get().is_null()
}

/// A helper's loop: runs each region published until the leader stops.
fn help(team: &Team) {
    // The leader itself may pop its own spawned helper job while it waits inside `f`
    // (a nested rayon join); it must not wait for itself.
    if std::thread::current().id() == team.leader {
        return;
    }
    let mut seen = 0;
    loop {
        wait_until(|| {
            team.stop.load(Ordering::Acquire) || team.generation.load(Ordering::Acquire) != seen
        });
        if team.stop.load(Ordering::Acquire) {
            return;
        }
        seen = team.generation.load(Ordering::Acquire);
        // Announce first, then look: the leader retires the job before it waits for
        // `active` to drain, so a job seen here stays alive until `active` drops again.
        team.active.fetch_add(1, Ordering::SeqCst);
        let _leave = Leave(&team.active);
        let job = team.job.load(Ordering::SeqCst);
        if !job.is_null() {
            // SAFETY: `job` points to the leader's `&dyn Fn()`, which outlives every
            // helper counted in `active` (the leader waits for it to drain before
            // `run_region` returns or unwinds).
            let f = unsafe { &*(job as *const &(dyn Fn() + Sync)) };
            f();
        }
    }
}

/// Leaves a region (also when its function panics): one helper fewer inside it.
struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Spins (then yields) until `done`.
fn wait_until(done: impl Fn() -> bool) {
    let mut spins = 0u32;
    while !done() {
        if spins < SPINS_BEFORE_YIELD {
            spins += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// Runs `participant` on the leader and on every helper that joins before the leader
/// finishes its share; returns (or unwinds, when `participant` panics on the leader) only
/// once every helper has left it.
fn run_region(team: &Team, participant: &(dyn Fn() + Sync)) {
    /// Retires the job and waits for the helpers inside it.
    struct Retire<'t>(&'t Team);
    impl Drop for Retire<'_> {
        fn drop(&mut self) {
            self.0.job.store(std::ptr::null_mut(), Ordering::SeqCst);
            wait_until(|| self.0.active.load(Ordering::SeqCst) == 0);
        }
    }
    let slot: &(dyn Fn() + Sync) = participant;
    team.job
        .store(&slot as *const _ as *mut (), Ordering::SeqCst);
    let _retire = Retire(team);
    team.generation.fetch_add(1, Ordering::Release);
    participant();
}

/// One participant's unclaimed items `lo..hi`, packed `lo | hi << 32`, on a cache line of
/// its own (the owner's claims do not contend with another participant's).
#[repr(align(128))]
struct Region(AtomicU64);

impl Region {
    fn new(r: Range<usize>) -> Self {
        Region(AtomicU64::new(r.start as u64 | (r.end as u64) << 32))
    }

    /// Claims one item from the front (`front`) or the back.
    fn claim(&self, front: bool) -> Option<usize> {
        let mut cur = self.0.load(Ordering::Relaxed);
        loop {
            let (lo, hi) = ((cur & 0xffff_ffff) as usize, (cur >> 32) as usize);
            if lo >= hi {
                return None;
            }
            let (item, new) = if front {
                (lo, cur + 1)
            } else {
                (hi - 1, cur - (1 << 32))
            };
            match self
                .0
                .compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(item),
                Err(now) => cur = now,
            }
        }
    }
}

/// The items of one slice, handed out one at a time to several threads.
struct Items<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: `Items` gives out `&mut` to an item only for an index that a `Region` claim
// returned, and the regions partition the indices and return each at most once, so no two
// threads ever hold the same item; the items move between threads, hence `T: Send`.
unsafe impl<T: Send> Sync for Items<T> {}

impl<T> Items<T> {
    /// # Safety
    /// `i < len`, and no other reference to item `i` is alive.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get(&self, i: usize) -> &mut T {
        debug_assert!(i < self.len);
        // SAFETY: as this function's contract.
        unsafe { &mut *self.ptr.add(i) }
    }
}

/// Runs `f` on every item of `items`, each exactly once, in parallel: on the team inside
/// [`with_team`] (participant `p` takes the `p`-th contiguous run of the items in order,
/// then claims the others' remaining items from their ends), else through rayon.
pub fn for_each_mut<T: Send>(items: &mut [T], f: impl Fn(&mut T) + Sync + Send) {
    let team = LEADS.get();
    if team.is_null() {
        items.par_iter_mut().for_each(f);
        return;
    }
    // SAFETY: `LEADS` is set only while `with_team` runs on this thread, which keeps the
    // team alive until it clears `LEADS`.
    let team = unsafe { &*team };
    let n = items.len();
    let parts = rayon::current_num_threads().min(n);
    if parts <= 1 || n > u32::MAX as usize {
        items.iter_mut().for_each(f);
        return;
    }
    let regions: Vec<Region> = (0..parts)
        .map(|p| Region::new(p * n / parts..(p + 1) * n / parts))
        .collect();
    let items = Items {
        ptr: items.as_mut_ptr(),
        len: n,
    };
    let ticket = AtomicUsize::new(0);
    let participant = || {
        let p = ticket.fetch_add(1, Ordering::Relaxed) % parts;
        for k in 0..parts {
            let (region, front) = (&regions[(p + k) % parts], k == 0);
            while let Some(i) = region.claim(front) {
                // SAFETY: `i` came out of a claim: below `n` (the regions partition
                // `0..n`) and never returned again.
                f(unsafe { items.get(i) });
            }
        }
    };
    run_region(team, &participant);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    /// Every item exactly once, region after region, inside and outside a team, for any
    /// pool size and item count (including fewer items than threads and none).
    #[test]
    fn every_item_runs_once() {
        for threads in [1, 2, 3, 5] {
            let pool = pool(threads);
            for n in [0usize, 1, 2, 7, 64, 1000] {
                let mut items = vec![0u32; n];
                pool.install(|| {
                    for_each_mut(&mut items, |x| *x += 1);
                    assert!(!in_team());
                    with_team(|| {
                        assert_eq!(in_team(), threads > 1);
                        for _ in 0..200 {
                            for_each_mut(&mut items, |x| *x += 1);
                        }
                    });
                    assert!(!in_team());
                });
                assert!(
                    items.iter().all(|&c| c == 201),
                    "{threads} threads, {n} items"
                );
            }
        }
    }

    /// The team's threads do share a region's work, and the same thread leads throughout.
    #[test]
    fn helpers_take_part() {
        let pool = pool(2);
        let seen = std::sync::Mutex::new(std::collections::HashSet::new());
        let mut items = vec![0u8; 64];
        pool.install(|| {
            with_team(|| {
                for _ in 0..2000 {
                    for_each_mut(&mut items, |_| {
                        // Long enough that a spinning helper claims some items.
                        std::thread::sleep(std::time::Duration::from_micros(20));
                        seen.lock().unwrap().insert(std::thread::current().id());
                    });
                    if seen.lock().unwrap().len() == 2 {
                        break;
                    }
                }
            })
        });
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    /// Claims from either end meet without overlap or gap.
    #[test]
    fn front_and_back_claims_partition_a_region() {
        let r = Region::new(10..37);
        let mut got = Vec::new();
        let mut front = true;
        while let Some(i) = r.claim(front) {
            got.push(i);
            front = !front;
        }
        got.sort();
        assert_eq!(got, (10..37).collect::<Vec<_>>());
    }

    /// A nested rayon join inside a team (code that did not go through `for_each_mut`)
    /// neither deadlocks nor loses work, and a panic inside the team releases it.
    #[test]
    fn nested_rayon_work_and_panics_release_the_team() {
        let pool = pool(2);
        let (a, b) = pool.install(|| {
            with_team(|| {
                let mut v = vec![1u64; 10_000];
                for_each_mut(&mut v, |x| *x *= 3);
                rayon::join(|| v.iter().sum::<u64>(), || v.par_iter().sum::<u64>())
            })
        });
        assert_eq!((a, b), (30_000, 30_000));
        let r = pool.install(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                with_team(|| {
                    let mut v = vec![0u8; 8];
                    for_each_mut(&mut v, |x| {
                        if *x == 0 {
                            panic!("inside the team")
                        }
                    })
                })
            }))
        });
        assert!(r.is_err());
        // The pool still works.
        let mut items = vec![0u8; 16];
        pool.install(|| with_team(|| for_each_mut(&mut items, |x| *x = 1)));
        assert!(items.iter().all(|&x| x == 1));
    }
}

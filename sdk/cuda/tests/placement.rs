//! One set of KV placement rules ([`jetvlm_kvcache::placement::Rules`]) for both caches:
//! random operation sequences go through the CPU cell bookkeeping ([`Cells`]) and the device
//! block table ([`KvBlockTable`], appended in prefill chunks as the device forward pass
//! does), and after every step each engine holds exactly the tokens its rules say: the
//! precision, position and frame of every token, the order attention reads them in, the
//! counts; a refused operation changes nothing, evicting a frame frees exactly its tokens,
//! and truncating back to an earlier state restores it. Where the engines follow the same
//! rules their models agree token for token; the documented differences have a test each.

use std::collections::HashSet;

use jetvlm_core::{FrameId, TokenKind};
use jetvlm_cuda::kvtable::PREFILL_CHUNK;
use jetvlm_cuda::{BlockEntry, BlockKind, DevicePolicy, KvBlockTable, TableMark};
use jetvlm_kvcache::KvPolicy;
use jetvlm_kvcache::cells::{BlockMeta, CellCounts, Cells, Owner, PoolKind};
use jetvlm_kvcache::placement::{Engine, Precision, Rules, Token};
use proptest::prelude::*;

/// An operation with its frame ids resolved.
#[derive(Clone, Debug)]
enum Op {
    Text(usize),
    /// A frame span: its id (none: an id-less frame, device only), tokens, salience scores
    /// (the CPU keeps the most salient FP16 under `salient=on`), and whether the CPU appends
    /// it pending and settles it with the scores.
    Frame {
        id: Option<FrameId>,
        n: usize,
        salience: Option<Vec<f32>>,
        pending: bool,
    },
    Evict(FrameId),
    Truncate(usize),
    Clear,
    Mark,
    RollBack,
}

fn precision(pool: PoolKind) -> Precision {
    match pool {
        PoolKind::Fp16 => Precision::Fp16,
        PoolKind::Quant => Precision::Quant,
    }
}

/// Asserts `got == want`, naming the first token that differs (the lists are long).
fn assert_same<T: PartialEq + std::fmt::Debug>(got: &[T], want: &[T], what: &str) {
    if let Some(i) = (0..got.len().min(want.len())).find(|&i| got[i] != want[i]) {
        panic!(
            "{what}: token {i} is {:?}, the rules say {:?}",
            got[i], want[i]
        );
    }
    assert_eq!(got.len(), want.len(), "{what}: tokens held");
}

/// Positions of `n` tokens appended after `rules`' next position.
fn positions(rules: &Rules, n: usize) -> Vec<u32> {
    let p = rules.next_position();
    (p..p + n as u32).collect()
}

/// What a CPU cache holds, for "nothing changed" and "restored" comparisons.
#[derive(Clone, Debug, PartialEq)]
struct CpuState {
    blocks: Vec<BlockMeta>,
    counts: CellCounts,
    frames: Vec<FrameId>,
}

/// The CPU cache and its rules.
struct Cpu {
    policy: KvPolicy,
    cells: Cells,
    rules: Rules,
    /// Rules state (tokens, next position) and engine state after each step since a clear.
    history: Vec<(Vec<Token>, u32, CpuState)>,
    mark: Option<CpuState>,
    /// Truncations that came back to an earlier state (and restored it).
    restored: usize,
}

impl Cpu {
    fn new(policy: &KvPolicy) -> Self {
        let mut s = Self {
            policy: policy.clone(),
            cells: Cells::new(policy.fp16_block_tokens, policy.quant_block_tokens, 1 << 20),
            rules: Rules::new(policy, Engine::Cpu),
            history: Vec::new(),
            mark: None,
            restored: 0,
        };
        s.remember();
        s
    }

    fn state(&self) -> CpuState {
        CpuState {
            blocks: self.cells.blocks().cloned().collect(),
            counts: self.cells.counts(),
            frames: self.cells.frames().to_vec(),
        }
    }

    fn remember(&mut self) {
        let entry = (
            self.rules.tokens().to_vec(),
            self.rules.next_position(),
            self.state(),
        );
        self.history.push(entry);
    }

    /// Applies `op` to the rules and the cache; both must accept or refuse it. Returns
    /// whether it was accepted.
    fn step(&mut self, op: &Op) -> bool {
        let before = self.state();
        let p = &self.policy;
        let (want, got) = match op {
            Op::Text(n) => {
                let pos = positions(&self.rules, *n);
                let want = self.rules.append(TokenKind::Text, *n, None, None);
                let got = self.cells.append(p, TokenKind::Text, &pos, None, None);
                (want.is_ok(), got.map(|_| ()).map_err(|e| e.to_string()))
            }
            Op::Frame {
                id,
                n,
                salience,
                pending,
            } => {
                let pos = positions(&self.rules, *n);
                let want = self
                    .rules
                    .append(TokenKind::Frame, *n, *id, salience.as_deref());
                let got = match (id, pending, salience) {
                    (Some(f), true, Some(s)) => self
                        .cells
                        .append_pending_frame(p, &pos, *f)
                        .and_then(|span| {
                            let (settled, old) = self.cells.settle_frame(p, &span, s)?;
                            self.cells.release_blocks(&old);
                            assert!(!settled.is_pending());
                            Ok(())
                        }),
                    _ => self
                        .cells
                        .append(p, TokenKind::Frame, &pos, *id, salience.as_deref())
                        .map(|_| ()),
                };
                (want.is_ok(), got.map_err(|e| e.to_string()))
            }
            Op::Evict(f) => {
                let want = self.rules.evict_frame(*f);
                let got = self.cells.evict_frame(*f);
                (want.is_ok(), got.map_err(|e| e.to_string()))
            }
            Op::Truncate(n) => {
                let want = self.rules.truncate_last(*n);
                let got = self.cells.truncate_last(*n);
                (want.is_ok(), got.map_err(|e| e.to_string()))
            }
            Op::Clear => {
                self.rules.clear();
                self.cells.clear();
                self.history.clear();
                (true, Ok(()))
            }
            Op::Mark => {
                self.rules.mark();
                self.mark = Some(before.clone());
                (true, Ok(()))
            }
            Op::RollBack => match self.rules.roll_back() {
                // The CPU rolls back by truncating what came since the mark.
                Ok(n) => {
                    self.cells.truncate_last(n).unwrap();
                    assert_eq!(Some(self.state()), self.mark.take(), "roll back");
                    (true, Ok(()))
                }
                Err(_) => return false,
            },
        };
        assert_eq!(want, got.is_ok(), "CPU {op:?}: {got:?}");
        if !want {
            assert_eq!(self.state(), before, "a refused {op:?} changes nothing");
            return false;
        }
        self.check();
        if let Op::Truncate(_) = op {
            // Truncating back to an earlier state restores it.
            let now = (self.rules.tokens(), self.rules.next_position());
            if let Some((_, _, earlier)) = self
                .history
                .iter()
                .rev()
                .find(|(t, p, _)| (&t[..], *p) == now)
            {
                assert_eq!(&self.state(), earlier, "truncation restores the state");
                self.restored += 1;
            }
        }
        if let Op::Evict(_) | Op::Truncate(_) = op {
            self.mark = None;
        }
        self.remember();
        true
    }

    /// The cache holds exactly the rules' tokens.
    fn check(&self) {
        let (cells, rules) = (&self.cells, &self.rules);
        let mut seen = Vec::new();
        let mut ids = HashSet::new();
        for b in cells.blocks() {
            let cap = match b.pool {
                PoolKind::Fp16 => self.policy.fp16_block_tokens,
                PoolKind::Quant => self.policy.quant_block_tokens,
            };
            assert!(!b.seqs.is_empty() && b.seqs.len() <= cap, "{b:?}");
            assert!(b.seqs.windows(2).all(|w| w[0] < w[1]), "{b:?}");
            assert!(ids.insert((b.pool, b.id)), "block {b:?} listed twice");
            let (kind, frame) = match b.owner {
                Owner::Text => (TokenKind::Text, None),
                Owner::Frame(f) => (TokenKind::Frame, Some(f)),
            };
            for (&seq, &position) in b.seqs.iter().zip(&b.positions) {
                seen.push(Token {
                    seq,
                    position,
                    kind,
                    frame,
                    precision: precision(b.pool),
                });
            }
        }
        // Attention reads in sequence order.
        seen.sort_by_key(|t| t.seq);
        assert_same(&seen, rules.tokens(), "CPU tokens");
        // Text fills its blocks in order: only a pool's newest text block is partly filled.
        for (pool, cap) in [
            (PoolKind::Fp16, self.policy.fp16_block_tokens),
            (PoolKind::Quant, self.policy.quant_block_tokens),
        ] {
            let text: Vec<_> = cells
                .blocks()
                .filter(|b| b.pool == pool && b.owner == Owner::Text)
                .collect();
            for b in text.iter().rev().skip(1) {
                assert_eq!(b.seqs.len(), cap, "an older text block is full: {b:?}");
            }
        }
        let c = cells.counts();
        let count = |f: &dyn Fn(&Token) -> bool| rules.tokens().iter().filter(|t| f(t)).count();
        assert_eq!(c.tokens, rules.len());
        assert_eq!(c.text_tokens, count(&|t| t.kind == TokenKind::Text));
        assert_eq!(c.frame_tokens, count(&|t| t.kind == TokenKind::Frame));
        assert_eq!(c.fp16_tokens, rules.fp16_tokens());
        assert_eq!(cells.frames(), &rules.frames()[..]);
        // The largest position appended, which the caller rewinds after a truncation.
        assert!(cells.next_position() >= rules.next_position());
    }
}

/// What a device table holds, for "nothing changed" and "restored" comparisons.
#[derive(Clone, Debug, PartialEq)]
struct DevState {
    entries: Vec<BlockEntry>,
    owners: Vec<Option<FrameId>>,
    tokens: (usize, usize),
    in_use: (usize, usize),
    next_position: usize,
}

/// The device table and its rules.
struct Dev {
    table: KvBlockTable,
    rules: Rules,
    history: Vec<(Vec<Token>, u32, DevState)>,
    mark: Option<(TableMark, DevState, (usize, usize))>,
    restored: usize,
}

impl Dev {
    fn new(policy: &KvPolicy) -> Self {
        let p = DevicePolicy::new(policy, 1, 64).unwrap();
        let mut s = Self {
            table: KvBlockTable::new(p, 1 << 16, 1 << 16),
            rules: Rules::new(
                policy,
                Engine::Device {
                    chunk: PREFILL_CHUNK,
                },
            ),
            history: Vec::new(),
            mark: None,
            restored: 0,
        };
        s.remember();
        s
    }

    fn state(&self) -> DevState {
        DevState {
            entries: self.table.entries().to_vec(),
            owners: self.table.owners().to_vec(),
            tokens: self.table.token_counts(),
            in_use: self.table.blocks_in_use(),
            next_position: self.table.next_position(),
        }
    }

    fn remember(&mut self) {
        let entry = (
            self.rules.tokens().to_vec(),
            self.rules.next_position(),
            self.state(),
        );
        self.history.push(entry);
    }

    /// Appends a span in prefill chunks, as the device forward pass does.
    fn append(&mut self, kind: TokenKind, n: usize, id: Option<FrameId>) -> Result<(), String> {
        let mut start = 0;
        loop {
            let piece = (n - start).min(PREFILL_CHUNK);
            let placed = match id {
                Some(f) => self.table.append_frame(f, piece),
                None => self.table.append(kind, piece),
            }
            .map_err(|e| e.to_string())?;
            // Every token of the piece is placed once, in order.
            let mut src = 0;
            for pl in &placed {
                assert_eq!(pl.src_token, src, "{placed:?}");
                src += pl.len;
            }
            assert_eq!(src, piece);
            start += piece;
            if start >= n {
                return Ok(());
            }
        }
    }

    fn step(&mut self, op: &Op) -> bool {
        let before = self.state();
        let (want, got) = match op {
            Op::Text(n) => {
                let want = self.rules.append(TokenKind::Text, *n, None, None);
                (want.is_ok(), self.append(TokenKind::Text, *n, None))
            }
            Op::Frame {
                id, n, salience, ..
            } => {
                let want = self
                    .rules
                    .append(TokenKind::Frame, *n, *id, salience.as_deref());
                (want.is_ok(), self.append(TokenKind::Frame, *n, *id))
            }
            Op::Evict(f) => {
                let want = self.rules.evict_frame(*f);
                let got = self.table.evict_frame(*f).map_err(|e| e.to_string());
                if let (Ok(w), Ok(g)) = (&want, &got) {
                    assert_eq!(w, g, "evicting frame {f} frees exactly its tokens");
                }
                (want.is_ok(), got.map(|_| ()))
            }
            Op::Truncate(n) => {
                let want = self.rules.truncate_last(*n);
                let got = self.table.truncate_last(*n).map_err(|e| e.to_string());
                (want.is_ok(), got)
            }
            Op::Clear => {
                self.rules.clear();
                self.table.clear();
                self.history.clear();
                (true, Ok(()))
            }
            Op::Mark => {
                self.rules.mark();
                self.mark = Some((self.table.mark(), before.clone(), self.table.used_blocks()));
                (true, Ok(()))
            }
            Op::RollBack => match self.rules.roll_back() {
                Ok(_) => {
                    let (mark, state, used) = self.mark.take().unwrap();
                    self.table.rollback(mark);
                    assert_eq!(self.state(), state, "roll back");
                    assert_eq!(self.table.used_blocks(), used, "roll back");
                    (true, Ok(()))
                }
                Err(_) => return false,
            },
        };
        assert_eq!(want, got.is_ok(), "device {op:?}: {got:?}");
        if !want {
            assert_eq!(self.state(), before, "a refused {op:?} changes nothing");
            return false;
        }
        self.check();
        if let Op::Truncate(_) = op {
            let now = (self.rules.tokens(), self.rules.next_position());
            if let Some((_, _, earlier)) = self
                .history
                .iter()
                .rev()
                .find(|(t, p, _)| (&t[..], *p) == now)
            {
                assert_eq!(&self.state(), earlier, "truncation restores the state");
                self.restored += 1;
            }
        }
        if let Op::Evict(_) | Op::Truncate(_) | Op::Clear = op {
            self.mark = None;
        }
        self.remember();
        true
    }

    /// The table holds exactly the rules' tokens, in attention order, each block's tokens
    /// at consecutive order indexes.
    fn check(&self) {
        let (t, rules) = (&self.table, &self.rules);
        let block_tokens = t.policy().layout.block_tokens;
        assert_eq!(t.entries().len(), t.owners().len());
        let mut seen = Vec::new();
        let mut blocks = HashSet::new();
        for (e, &owner) in t.entries().iter().zip(t.owners()) {
            assert!(e.len > 0 && e.len as usize <= block_tokens, "{e:?}");
            assert!(
                blocks.insert((e.kind == BlockKind::Frame, e.block)),
                "block listed twice: {e:?}"
            );
            let precision = match e.kind {
                BlockKind::Text => Precision::Fp16,
                BlockKind::Frame => Precision::Quant,
            };
            for i in 0..e.len {
                seen.push((e.order as u32 + i, precision, owner));
            }
        }
        let want: Vec<_> = rules
            .tokens()
            .iter()
            .map(|t| (t.position, t.precision, t.frame))
            .collect();
        assert_same(&seen, &want, "device tokens in attention order");
        let fp16 = rules.fp16_tokens();
        assert_eq!(t.token_counts(), (fp16, rules.len() - fp16));
        assert_eq!(t.len(), rules.len());
        assert_eq!(t.next_position(), rules.next_position() as usize);
        let entries_of = |k| t.entries().iter().filter(|e| e.kind == k).count();
        assert_eq!(
            t.blocks_in_use(),
            (entries_of(BlockKind::Text), entries_of(BlockKind::Frame))
        );
    }
}

/// Both engines over one operation sequence.
struct Both {
    policy: KvPolicy,
    cpu: Cpu,
    dev: Dev,
    /// Whether the two models must still agree token for token: no operation accepted by
    /// one engine only, no documented difference exercised.
    in_sync: bool,
    next_frame: FrameId,
    stats: Stats,
}

/// What a run of operations exercised.
#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    /// Operations accepted by the CPU only, by the device only.
    cpu_only: usize,
    device_only: usize,
    /// Accepted by both.
    evicted: usize,
    rolled_back: usize,
    /// Frames appended in more than one prefill chunk (device).
    chunked: usize,
    /// Steps where both models held tokens and had to agree.
    agreed: usize,
}

impl Both {
    fn new(name: &str) -> Self {
        let policy: KvPolicy = name.parse().unwrap();
        Self {
            cpu: Cpu::new(&policy),
            dev: Dev::new(&policy),
            policy,
            in_sync: true,
            next_frame: 0,
            stats: Stats::default(),
        }
    }

    /// Applies `op` to both engines; returns (CPU accepted, device accepted).
    fn step(&mut self, op: &Op) -> (bool, bool) {
        let accepted = (self.cpu.step(op), self.dev.step(op));
        let st = &mut self.stats;
        match (accepted, op) {
            ((true, false), _) => st.cpu_only += 1,
            ((false, true), _) => st.device_only += 1,
            ((true, true), Op::Evict(_)) => st.evicted += 1,
            ((true, true), Op::RollBack) => st.rolled_back += 1,
            ((_, true), Op::Frame { n, .. }) if *n > PREFILL_CHUNK => st.chunked += 1,
            _ => {}
        }
        let differs = match op {
            Op::RollBack => accepted.0 && self.policy.sink_tokens > 0,
            Op::Frame { n, salience, .. } => {
                (*n > PREFILL_CHUNK && self.policy.sink_tokens > 0)
                    || (salience.is_some() && self.policy.salient_frame_tokens)
            }
            _ => false,
        };
        if accepted.0 != accepted.1 || differs {
            self.in_sync = false;
        }
        if matches!(op, Op::Clear) {
            self.in_sync = true;
        }
        if self.in_sync {
            // Sequence numbers aside (a roll back rewinds them on the device only).
            let placed = |r: &Rules| -> Vec<_> {
                r.tokens()
                    .iter()
                    .map(|t| (t.position, t.kind, t.frame, t.precision))
                    .collect()
            };
            assert_eq!(placed(&self.cpu.rules), placed(&self.dev.rules), "{op:?}");
            if !self.cpu.rules.is_empty() {
                self.stats.agreed += 1;
            }
        }
        accepted
    }

    fn fresh_frame(&mut self) -> FrameId {
        self.next_frame += 1;
        self.next_frame
    }

    /// Frames cached in either engine.
    fn cached_frames(&self) -> Vec<FrameId> {
        let mut f = self.cpu.rules.frames();
        f.extend(self.dev.rules.frames());
        f.sort_unstable();
        f.dedup();
        f
    }
}

/// Frame ids as generated (resolved against the frames cached when the step runs).
#[derive(Clone, Debug)]
enum Id {
    Fresh,
    Cached(usize),
    Without,
}

#[derive(Clone, Debug)]
enum Gen {
    Text(usize),
    Frame {
        id: Id,
        n: usize,
        salience: Option<u32>,
        pending: bool,
    },
    Evict(usize),
    Truncate(usize),
    /// Truncate the newest span exactly (a question and its answer).
    TruncateSpan,
    Clear,
    Mark,
    RollBack,
}

fn gen_op() -> impl Strategy<Value = Gen> {
    let id = prop_oneof![6 => Just(Id::Fresh), 2 => (0usize..4).prop_map(Id::Cached), 1 => Just(Id::Without)];
    let n = prop_oneof![8 => 0usize..150, 1 => 500usize..700];
    prop_oneof![
        5 => (0usize..80).prop_map(Gen::Text),
        5 => (id, n, proptest::option::of(any::<u32>()), any::<bool>())
            .prop_map(|(id, n, salience, pending)| Gen::Frame { id, n, salience, pending }),
        2 => (0usize..5).prop_map(Gen::Evict),
        2 => (0usize..20).prop_map(Gen::Truncate),
        3 => Just(Gen::TruncateSpan),
        1 => Just(Gen::Clear),
        2 => Just(Gen::Mark),
        2 => Just(Gen::RollBack),
    ]
}

/// Salience scores with ties (a small range), from a seed.
fn scores(seed: u32, n: usize) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            let h = (seed ^ i.wrapping_mul(0x9E37_79B9)).wrapping_mul(0x85EB_CA6B);
            (h >> 27) as f32
        })
        .collect()
}

const POLICIES: [&str; 9] = [
    "mixed",
    "mixed:keys=token",
    "mixed:sinks=40,budget=0.05",
    "mixed:salient=on,fblock=16",
    "mixed:qblock=16,sinks=20,budget=0.3,salient=on,keys=token",
    "mixed:sinks=600,budget=0.9,qblock=16",
    "fp16",
    "int4-all",
    "mixed:bits=2,qblock=128,fblock=64,budget=0.5,sinks=8",
];

/// Random sessions under every policy: after every step both engines hold what their rules
/// say (see the module doc). The sessions must have exercised each kind of step.
#[test]
fn both_caches_follow_the_placement_rules() {
    use proptest::test_runner::{Config, TestRunner};
    use std::sync::Mutex;
    let total = Mutex::new((Stats::default(), 0usize));
    let strategy = (
        0..POLICIES.len(),
        proptest::collection::vec(gen_op(), 1..40),
    );
    let mut runner = TestRunner::new(Config {
        cases: 256,
        failure_persistence: None,
        ..Config::default()
    });
    let run = runner.run(&strategy, |(policy, ops)| {
        let mut both = Both::new(POLICIES[policy]);
        let mut last_span = 0;
        for g in ops {
            let op = resolve(&mut both, g, last_span);
            both.step(&op);
            last_span = match op {
                Op::Text(n) | Op::Frame { n, .. } => n,
                _ => 0,
            };
        }
        let mut t = total.lock().unwrap();
        let (s, b) = (&mut t.0, &both.stats);
        s.cpu_only += b.cpu_only;
        s.device_only += b.device_only;
        s.evicted += b.evicted;
        s.rolled_back += b.rolled_back;
        s.chunked += b.chunked;
        s.agreed += b.agreed;
        t.1 += both.cpu.restored.min(both.dev.restored);
        Ok(())
    });
    if let Err(e) = run {
        panic!("{e}");
    }
    let (s, restored) = *total.lock().unwrap();
    let all = [
        s.cpu_only,
        s.device_only,
        s.evicted,
        s.rolled_back,
        s.chunked,
        s.agreed,
        restored,
    ];
    assert!(all.iter().all(|&n| n > 0), "{s:?}, restored {restored}");
}

/// `g` with its frame ids picked among those cached now.
fn resolve(both: &mut Both, g: Gen, last_span: usize) -> Op {
    match g {
        Gen::Text(n) => Op::Text(n),
        Gen::Frame {
            id,
            n,
            salience,
            pending,
        } => {
            let cached = both.cached_frames();
            let id = match id {
                Id::Cached(i) if !cached.is_empty() => Some(cached[i % cached.len()]),
                Id::Without => None,
                _ => Some(both.fresh_frame()),
            };
            Op::Frame {
                id,
                n,
                salience: salience.map(|s| scores(s, n)),
                pending,
            }
        }
        Gen::Evict(i) => {
            let cached = both.cached_frames();
            // One choice past the cached frames: a frame that is not cached.
            Op::Evict(
                cached
                    .get(i % (cached.len() + 1))
                    .copied()
                    .unwrap_or(1 << 40),
            )
        }
        Gen::Truncate(n) => Op::Truncate(n),
        Gen::TruncateSpan => Op::Truncate(last_span),
        Gen::Clear => Op::Clear,
        Gen::Mark => Op::Mark,
        Gen::RollBack => Op::RollBack,
    }
}

fn frame(id: FrameId, n: usize) -> Op {
    Op::Frame {
        id: Some(id),
        n,
        salience: None,
        pending: false,
    }
}

fn fp16_of(rules: &Rules, id: FrameId) -> usize {
    rules
        .tokens()
        .iter()
        .filter(|t| t.frame == Some(id) && t.precision == Precision::Fp16)
        .count()
}

/// Where the engines legitimately differ, each engine still follows its rules (checked by
/// every step) and the rules differ as documented.
#[test]
fn the_documented_differences() {
    // The budget is taken per prefill chunk on the device: a 600-token frame that starts
    // the sequence keeps floor(0.05 * 600) = 30 of 40 sinks FP16 on the CPU, and
    // floor(0.05 * 512) = 25 on the device.
    let mut b = Both::new("mixed:sinks=40,budget=0.05");
    b.step(&frame(1, 600));
    assert_eq!(fp16_of(&b.cpu.rules, 1), 30);
    assert_eq!(fp16_of(&b.dev.rules, 1), 25);
    // Sinks that reach into the second chunk.
    let mut b = Both::new("mixed:sinks=600,budget=0.9,qblock=16");
    b.step(&frame(1, 700));
    assert_eq!(fp16_of(&b.cpu.rules, 1), 600);
    assert_eq!(fp16_of(&b.dev.rules, 1), 460 + 88);

    // Salient tokens stay FP16 on the CPU only: a 64-token frame that starts the sequence
    // has a budget of floor(0.25 * 64) = 16 FP16 tokens, 4 of them sinks, so the 12 most
    // salient tokens fill a 16-token FP16 block with them.
    let mut b = Both::new("mixed:salient=on,fblock=16,budget=0.25");
    let salience: Vec<f32> = (0..64).map(|i| (i % 7) as f32).collect();
    for pending in [false, true] {
        b.step(&Op::Clear);
        b.step(&Op::Frame {
            id: Some(1),
            n: 64,
            salience: Some(salience.clone()),
            pending,
        });
        b.step(&Op::Text(64));
        assert_eq!(fp16_of(&b.cpu.rules, 1), 16, "pending {pending}");
        assert_eq!(fp16_of(&b.dev.rules, 1), 4);
    }

    // Frames without an id, and a frame id continued in pieces: device only.
    let mut b = Both::new("mixed");
    let without = Op::Frame {
        id: None,
        n: 10,
        salience: None,
        pending: false,
    };
    assert_eq!(b.step(&without), (false, true));
    b.step(&Op::Clear);
    assert_eq!(b.step(&frame(1, 30)), (true, true));
    assert_eq!(b.step(&frame(1, 30)), (false, true));
    // Text dropped again leaves the frame the newest: its next piece is welcome.
    b.step(&Op::Text(3));
    b.step(&Op::Truncate(3));
    assert_eq!(b.step(&frame(1, 30)), (false, true));
    b.step(&Op::Text(3));
    assert_eq!(b.step(&frame(1, 30)), (false, false));
    // Not after a frame appended and evicted in between either.
    b.step(&Op::Clear);
    b.step(&frame(1, 30));
    b.step(&frame(2, 30));
    b.step(&Op::Evict(2));
    assert_eq!(b.step(&frame(1, 30)), (false, false));

    // Truncation: the CPU drops a frame's tokens, the device refuses; the device does not
    // truncate across an evicted frame, the CPU does.
    let mut b = Both::new("mixed");
    b.step(&frame(1, 64));
    assert_eq!(b.step(&Op::Truncate(10)), (true, false));
    let mut b = Both::new("mixed");
    b.step(&Op::Text(5));
    b.step(&frame(1, 64));
    b.step(&Op::Text(3));
    b.step(&Op::Evict(1));
    assert_eq!(b.step(&Op::Truncate(8)), (true, false));
    assert_eq!(b.cpu.rules.next_position(), 0);
    assert_eq!(b.dev.rules.next_position(), 72);
    assert_eq!(b.step(&Op::Truncate(3)), (false, true));
    assert_eq!(b.dev.rules.next_position(), 69);

    // Rolling back: the device rewinds sequence numbers and hands sinks out again.
    let mut b = Both::new("mixed");
    b.step(&Op::Mark);
    b.step(&frame(1, 64));
    assert_eq!(b.step(&Op::RollBack), (true, true));
    b.step(&frame(2, 64));
    assert_eq!(fp16_of(&b.cpu.rules, 2), 0);
    assert_eq!(fp16_of(&b.dev.rules, 2), 4);

    // Empty spans: refused by the CPU, nothing on the device.
    let mut b = Both::new("mixed");
    assert_eq!(b.step(&Op::Text(0)), (false, true));
    assert_eq!(b.step(&frame(1, 0)), (false, true));
    assert!(b.dev.rules.is_empty());
}

/// The rules both engines share, on a camera session: sinks of a frame that starts the
/// sequence, a rolling window of frames, questions dropped again and their positions
/// reused, a clear that starts the sinks again.
#[test]
fn a_camera_session_follows_the_shared_rules() {
    for name in ["mixed", "mixed:keys=token", "fp16", "int4-all"] {
        let mut b = Both::new(name);
        b.step(&frame(0, 64));
        b.step(&Op::Text(10));
        for f in 1..6 {
            b.step(&frame(f, 64));
            assert_eq!(b.step(&Op::Evict(f - 1)), (true, true), "{name}");
            b.step(&Op::Text(9));
            assert_eq!(b.step(&Op::Truncate(9)), (true, true), "{name}");
        }
        assert!(b.in_sync, "{name}");
        assert_eq!(b.cpu.rules.next_position(), 6 * 64 + 10, "{name}");
        let frames = b.cpu.rules.frames();
        assert_eq!(frames, vec![5], "{name}");
        b.step(&Op::Clear);
        b.step(&frame(9, 64));
        let sinks = if name == "mixed" || name == "mixed:keys=token" {
            4
        } else {
            0
        };
        let want = if name == "fp16" { 64 } else { sinks };
        assert_eq!(fp16_of(&b.dev.rules, 9), want, "{name}");
        assert!(b.in_sync, "{name}");
    }
}

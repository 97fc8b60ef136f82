//! Property tests of the cell bookkeeping against a simple model (a list of tokens).

use jetvlm_core::TokenKind;
use jetvlm_kvcache::KvPolicy;
use jetvlm_kvcache::cells::{Cells, Owner, PoolKind};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Text(usize),
    Frame(usize),
    Evict(usize),
    Truncate(usize),
    Clear,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..40).prop_map(Op::Text),
        4 => (1usize..150).prop_map(Op::Frame),
        2 => (0usize..8).prop_map(Op::Evict),
        2 => (0usize..50).prop_map(Op::Truncate),
        1 => Just(Op::Clear),
    ]
}

/// Model token: (seq, position, frame).
type Tok = (u32, u32, Option<u64>);

fn check(cells: &Cells, model: &[Tok], policy: &KvPolicy) {
    assert_eq!(cells.len(), model.len());
    let mut seen: Vec<Tok> = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for b in cells.blocks() {
        assert!(!b.seqs.is_empty(), "empty blocks are released");
        let cap = if b.pool == PoolKind::Fp16 {
            policy.fp16_block_tokens
        } else {
            policy.quant_block_tokens
        };
        assert!(b.seqs.len() <= cap);
        assert!(
            b.seqs.windows(2).all(|w| w[0] < w[1]),
            "slots hold increasing seqs"
        );
        assert!(ids.insert((b.pool, b.id)), "an id is used once");
        assert!(
            !cells.free_ids(b.pool).contains(&b.id),
            "used ids are not free"
        );
        let frame = match b.owner {
            Owner::Text => None,
            Owner::Frame(f) => Some(f),
        };
        for (s, p) in b.seqs.iter().zip(&b.positions) {
            seen.push((*s, *p, frame));
        }
    }
    // Text fills its blocks in order: only a pool's newest text block is partly filled.
    for (pool, cap) in [
        (PoolKind::Fp16, policy.fp16_block_tokens),
        (PoolKind::Quant, policy.quant_block_tokens),
    ] {
        let text: Vec<_> = cells
            .blocks()
            .filter(|b| b.pool == pool && b.owner == Owner::Text)
            .collect();
        for b in text.iter().rev().skip(1) {
            assert_eq!(b.seqs.len(), cap, "an older text block is full: {b:?}");
        }
    }
    seen.sort();
    let mut want = model.to_vec();
    want.sort();
    assert_eq!(seen, want);
    let c = cells.counts();
    assert_eq!(
        c.frame_tokens,
        model.iter().filter(|t| t.2.is_some()).count()
    );
    assert_eq!(
        c.text_tokens,
        model.iter().filter(|t| t.2.is_none()).count()
    );
    let mut frames: Vec<u64> = Vec::new();
    for t in model {
        if let Some(f) = t.2
            && !frames.contains(&f)
        {
            frames.push(f);
        }
    }
    assert_eq!(cells.frames(), &frames[..]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn bookkeeping_matches_a_token_list(ops in proptest::collection::vec(op(), 1..40), policy_i in 0usize..3) {
        let policy = [KvPolicy::mixed(), KvPolicy::fp16(), KvPolicy::int4_all()][policy_i].clone();
        let cap = 600;
        let mut cells = Cells::new(policy.fp16_block_tokens, policy.quant_block_tokens, cap);
        let mut model: Vec<Tok> = Vec::new();
        let (mut next_seq, mut next_pos, mut next_frame) = (0u32, 0u32, 0u64);
        for op in ops {
            match op {
                Op::Text(n) | Op::Frame(n) => {
                    let frame = matches!(op, Op::Frame(_)).then_some(next_frame);
                    let kind = if frame.is_some() { TokenKind::Frame } else { TokenKind::Text };
                    let pos: Vec<u32> = (next_pos..next_pos + n as u32).collect();
                    let r = cells.append(&policy, kind, &pos, frame, None);
                    if model.len() + n > cap {
                        prop_assert!(r.is_err());
                        continue;
                    }
                    let span = r.unwrap();
                    prop_assert_eq!(span.len(), n);
                    cells.check_span("test", &span).unwrap();
                    for i in 0..n {
                        model.push((next_seq + i as u32, next_pos + i as u32, frame));
                    }
                    next_seq += n as u32;
                    next_pos += n as u32;
                    if frame.is_some() {
                        next_frame += 1;
                    }
                    prop_assert_eq!(cells.next_position(), next_pos);
                }
                Op::Evict(i) => {
                    let frames = cells.frames().to_vec();
                    if frames.is_empty() {
                        prop_assert!(cells.evict_frame(12345).is_err());
                        continue;
                    }
                    let f = frames[i % frames.len()];
                    cells.evict_frame(f).unwrap();
                    model.retain(|t| t.2 != Some(f));
                }
                Op::Truncate(n) => {
                    if n > model.len() {
                        prop_assert!(cells.truncate_last(n).is_err());
                        continue;
                    }
                    cells.truncate_last(n).unwrap();
                    model.sort();
                    model.truncate(model.len() - n);
                }
                Op::Clear => {
                    cells.clear();
                    model.clear();
                    next_seq = 0;
                    next_pos = 0;
                    prop_assert_eq!(cells.next_position(), 0);
                }
            }
            check(&cells, &model, &policy);
        }
    }
}

/// Dropping text that had opened a new block makes the block before it the open one again:
/// the next text fills it instead of opening another, as before the dropped text came.
#[test]
fn truncated_text_reopens_the_block_before() {
    let policy = KvPolicy::mixed();
    let mut cells = Cells::new(32, 64, 1000);
    let pos: Vec<u32> = (0..40).collect();
    cells
        .append(&policy, TokenKind::Text, &pos, None, None)
        .unwrap();
    let before: Vec<_> = cells
        .blocks()
        .map(|b| (b.pool, b.id, b.positions.clone()))
        .collect();
    let pos: Vec<u32> = (40..70).collect();
    cells
        .append(&policy, TokenKind::Text, &pos, None, None)
        .unwrap();
    cells.truncate_last(30 + 10).unwrap();
    assert_eq!(cells.counts().fp16_blocks, 1);
    let pos: Vec<u32> = (30..40).collect();
    cells
        .append(&policy, TokenKind::Text, &pos, None, None)
        .unwrap();
    // The same blocks hold the same positions (sequence numbers go on counting).
    let layout = |c: &Cells| -> Vec<_> {
        c.blocks()
            .map(|b| (b.pool, b.id, b.positions.clone()))
            .collect()
    };
    assert_eq!(layout(&cells), before);
}

#[test]
fn fp16_budget_takes_sinks_then_salient_frame_tokens() {
    // Budget 0.10, 4 sinks; salient tokens fill whole 8-token FP16 blocks.
    let policy: KvPolicy = "mixed:salient=on".parse().unwrap();
    let mut cells = Cells::new(8, 64, 10_000);
    // A frame first: its first 4 tokens are the sequence's sinks.
    let pos: Vec<u32> = (0..64).collect();
    let span = cells
        .append(&policy, TokenKind::Frame, &pos, Some(0), None)
        .unwrap();
    let fp16: Vec<usize> = (0..64)
        .filter(|&i| span.slots()[i].pool == PoolKind::Fp16)
        .collect();
    assert_eq!(fp16, vec![0, 1, 2, 3]);
    // Next frame with salience: budget floor(0.1 * 128) = 12, 4 used, so the 8 most
    // salient tokens stay FP16.
    let pos: Vec<u32> = (64..128).collect();
    let sal: Vec<f32> = (0..64)
        .map(|i| if i % 8 == 3 { 10.0 + i as f32 } else { 0.0 })
        .collect();
    let span = cells
        .append(&policy, TokenKind::Frame, &pos, Some(1), Some(&sal))
        .unwrap();
    let fp16: Vec<usize> = (0..64)
        .filter(|&i| span.slots()[i].pool == PoolKind::Fp16)
        .collect();
    assert_eq!(fp16, vec![3, 11, 19, 27, 35, 43, 51, 59]);
    // Text always FP16 and counts first: after a lot of text no frame token gets FP16.
    let pos: Vec<u32> = (128..400).collect();
    cells
        .append(&policy, TokenKind::Text, &pos, None, None)
        .unwrap();
    let pos: Vec<u32> = (400..464).collect();
    let span = cells
        .append(&policy, TokenKind::Frame, &pos, Some(2), Some(&sal))
        .unwrap();
    assert!(span.slots().iter().all(|s| s.pool == PoolKind::Quant));
}

//! `Tokenizer::from_dir` on a directory whose `tokenizer.json` is the fuzzed bytes up to the
//! first NUL; the rest (as lossy UTF-8) is encoded, decoded, and streamed through the
//! incremental detokenizer. Ids outside the vocabulary are decoded too.

#![no_main]

use jetvlm_decoder::Tokenizer;
use jetvlm_fuzz::{split_nul, write};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (json, text) = split_nul(data);
    let file = write("tok/tokenizer.json", json);
    let dir = file.parent().expect("scratch file has a parent");
    let Ok(tok) = Tokenizer::from_dir(dir) else {
        return;
    };
    let text = String::from_utf8_lossy(text);
    let _ = tok.vocab_size();
    for add_special in [false, true] {
        let Ok(ids) = tok.encode(&text, add_special) else {
            continue;
        };
        let _ = tok.decode(&ids, false);
        let _ = tok.decode(&ids, true);
        let mut inc = tok.incremental(true);
        for &id in &ids {
            let _ = inc.push(id);
        }
        let _ = inc.flush();
    }
    let _ = tok.decode(&[u32::MAX, 0, 1, 2], false);
    let mut inc = tok.incremental(false);
    let _ = inc.push(u32::MAX);
    let _ = inc.flush();
});

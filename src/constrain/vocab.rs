//! The tokenizer's vocabulary as bytes, in a byte trie: what a constraint walks to find every
//! token that spells a valid continuation, whatever the tokenization.

use std::collections::HashMap;

use tokenizers::Tokenizer;

use super::automaton::TokenMask;

/// How the vocabulary spells bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spelling {
    /// GPT-2 byte-level BPE: every byte is one printable character (Qwen, Llama 3, our students).
    ByteLevel,
    /// SentencePiece: `▁` is a space, `<0xNN>` a raw byte (Llama 2, Mistral).
    Metaspace,
}

/// GPT-2's byte <-> character table: printable bytes stand for themselves, the others are
/// shifted past 255.
fn byte_level_chars() -> HashMap<char, u8> {
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut shifted = 0u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                char::from(b)
            } else {
                shifted += 1;
                char::from_u32(255 + shifted).unwrap_or(char::REPLACEMENT_CHARACTER)
            };
            (c, b)
        })
        .collect()
}

fn spelling(tokenizer: &Tokenizer) -> Spelling {
    let decoder = serde_json::to_string(&tokenizer.get_decoder()).unwrap_or_default();
    if decoder.contains("ByteLevel") {
        Spelling::ByteLevel
    } else {
        Spelling::Metaspace
    }
}

/// The bytes each token stands for (empty for special tokens, which no text constraint allows).
pub fn token_bytes(tokenizer: &Tokenizer) -> Vec<Vec<u8>> {
    let size = tokenizer.get_vocab_size(true);
    let added = tokenizer.get_added_tokens_decoder();
    let table = byte_level_chars();
    let style = spelling(tokenizer);
    (0..size as u32)
        .map(|id| {
            if let Some(token) = added.get(&id) {
                return if token.special {
                    Vec::new()
                } else {
                    token.content.as_bytes().to_vec()
                };
            }
            let Some(piece) = tokenizer.id_to_token(id) else {
                return Vec::new();
            };
            match style {
                Spelling::ByteLevel => piece
                    .chars()
                    .map(|c| table.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_default(),
                Spelling::Metaspace => {
                    if let Some(hex) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>')) {
                        return u8::from_str_radix(hex, 16).map(|b| vec![b]).unwrap_or_default();
                    }
                    piece.replace('\u{2581}', " ").into_bytes()
                }
            }
        })
        .collect()
}

/// Every token in a byte trie, children sorted by byte, stored flat.
pub struct TokenTrie {
    /// Unique to this trie in the process (never reused, unlike its address): caches keyed by
    /// it cannot serve a reloaded model's vocabulary another's entries.
    id: u64,
    /// Children of node `n`: `edges[edge_start[n]..edge_start[n + 1]]`, as `(byte, child)`.
    edge_start: Vec<u32>,
    edges: Vec<(u8, u32)>,
    /// Tokens spelled exactly by node `n`: `tokens[token_start[n]..token_start[n + 1]]`.
    token_start: Vec<u32>,
    tokens: Vec<u32>,
    /// Bytes of each token id.
    bytes: Vec<Vec<u8>>,
    /// Text of special tokens (`</think>`), which no constraint allows but which may start one.
    special: HashMap<u32, Vec<u8>>,
}

impl TokenTrie {
    /// The trie of `tokenizer`'s vocabulary.
    pub fn new(tokenizer: &Tokenizer) -> Self {
        let mut trie = Self::from_token_bytes(token_bytes(tokenizer));
        trie.special = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content.into_bytes()))
            .collect();
        trie
    }

    /// The trie of tokens given by their bytes (index = token id).
    pub fn from_token_bytes(bytes: Vec<Vec<u8>>) -> Self {
        let mut children: Vec<Vec<(u8, u32)>> = vec![Vec::new()];
        let mut ends: Vec<Vec<u32>> = vec![Vec::new()];
        for (id, token) in bytes.iter().enumerate() {
            if token.is_empty() {
                continue;
            }
            let mut node = 0usize;
            for &b in token {
                node = match children[node].iter().find(|(c, _)| *c == b) {
                    Some(&(_, child)) => child as usize,
                    None => {
                        let child = children.len();
                        children.push(Vec::new());
                        ends.push(Vec::new());
                        children[node].push((b, child as u32));
                        child
                    }
                };
            }
            ends[node].push(id as u32);
        }
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut trie = Self {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            edge_start: Vec::with_capacity(children.len() + 1),
            edges: Vec::new(),
            token_start: Vec::with_capacity(children.len() + 1),
            tokens: Vec::new(),
            bytes,
            special: HashMap::new(),
        };
        for (mut kids, ids) in children.into_iter().zip(ends) {
            kids.sort_unstable();
            trie.edge_start.push(trie.edges.len() as u32);
            trie.edges.extend(kids);
            trie.token_start.push(trie.tokens.len() as u32);
            trie.tokens.extend(ids);
        }
        trie.edge_start.push(trie.edges.len() as u32);
        trie.token_start.push(trie.tokens.len() as u32);
        trie
    }

    /// The root node.
    pub const ROOT: u32 = 0;

    /// This trie's id, unique in the process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// `(byte, child)` edges of `node`, sorted by byte.
    pub fn children(&self, node: u32) -> &[(u8, u32)] {
        let n = node as usize;
        &self.edges[self.edge_start[n] as usize..self.edge_start[n + 1] as usize]
    }

    /// Token ids spelled exactly by `node`.
    pub fn tokens_at(&self, node: u32) -> &[u32] {
        let n = node as usize;
        &self.tokens[self.token_start[n] as usize..self.token_start[n + 1] as usize]
    }

    /// The bytes of token `id` (empty for special tokens and ids out of range).
    pub fn bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// The text token `id` writes: its bytes, or a special token's content.
    pub fn text(&self, id: u32) -> &[u8] {
        match self.special.get(&id) {
            Some(content) => content,
            None => self.bytes(id),
        }
    }

    /// Marks in `mask` every token whose bytes lead from `start` through `step` (`None`: the
    /// byte leads nowhere), walking the trie depth first.
    pub fn walk<S>(&self, start: S, step: impl Fn(&S, u8) -> Option<S>, mask: &mut TokenMask) {
        let mut stack = vec![(Self::ROOT, start)];
        while let Some((node, state)) = stack.pop() {
            for &(byte, child) in self.children(node) {
                let Some(next) = step(&state, byte) else { continue };
                for &id in self.tokens_at(child) {
                    mask.insert(id);
                }
                if !self.children(child).is_empty() {
                    stack.push((child, next));
                }
            }
        }
    }

    /// Number of token ids (the mask length).
    pub fn vocab_size(&self) -> usize {
        self.bytes.len()
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.edges.len() * 8
            + (self.edge_start.len() + self.token_start.len() + self.tokens.len()) * 4
            + self.bytes.iter().map(|b| b.len() + 24).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_level_table_is_a_bijection_with_gpt2_spaces() {
        let table = byte_level_chars();
        assert_eq!(table.len(), 256);
        assert_eq!(table[&'\u{120}'], b' ', "Ġ is the space");
        assert_eq!(table[&'\u{10a}'], b'\n', "Ċ is the newline");
        assert_eq!(table[&'A'], b'A');
    }

    #[test]
    fn the_trie_finds_tokens_by_their_bytes() {
        let trie = TokenTrie::from_token_bytes(vec![
            b"a".to_vec(),
            b"ab".to_vec(),
            Vec::new(),
            b"b".to_vec(),
            b"ab".to_vec(),
        ]);
        let root = trie.children(TokenTrie::ROOT);
        assert_eq!(root.iter().map(|e| e.0).collect::<Vec<_>>(), b"ab".to_vec());
        let a = root[0].1;
        assert_eq!(trie.tokens_at(a), &[0]);
        let ab = trie.children(a)[0].1;
        assert_eq!(trie.tokens_at(ab), &[1, 4], "two ids may spell the same bytes");
        assert_eq!(trie.bytes(2), b"");
        assert_eq!(trie.vocab_size(), 5);
    }
}

//! Byte-level BPE tokenizer (GPT-2 style) on top of the `tokenizers` crate.
//!
//! Pipeline: no normaliser; `ByteLevel` pre-tokenizer (GPT-2 regex split, every byte mapped
//! to one of 256 printable code points, no prefix space); a BPE model whose initial alphabet
//! is the full 256-symbol byte alphabet, so every input has an encoding and there is never an
//! unknown token; `ByteLevel` decoder, which maps the code points back to bytes, so
//! `decode(encode(s)) == s` for every string.
//!
//! Special tokens: `<|endoftext|>` (id 0, end of a row) and `<|response|>` (id 1, the
//! boundary between prompt and response). They are never produced by [`Tokenizer::encode`]:
//! text that happens to contain `<|endoftext|>` is encoded as ordinary bytes, so data cannot
//! forge a boundary; callers insert the ids with [`Tokenizer::eot_id`] and
//! [`Tokenizer::response_id`]. Decoding keeps special tokens (they render as their text).
//!
//! The tokenizer is trained once and then frozen. It is stored in the standard Hugging Face
//! `tokenizer.json` format, loadable unchanged by Python `tokenizers`
//! (`Tokenizer.from_file("tokenizer.json")`); set `tok.encode_special_tokens = True` there to
//! get exactly the ids of [`Tokenizer::encode`] (otherwise Python turns the literal text
//! `<|endoftext|>` into the special id).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::{AddedToken, TokenizerBuilder};

/// Text of the end-of-text special token (end of a row).
pub const EOT_TOKEN: &str = "<|endoftext|>";
/// Text of the prompt/response boundary special token.
pub const RESPONSE_TOKEN: &str = "<|response|>";
/// Size of the byte alphabet that seeds the vocabulary.
pub const BYTE_ALPHABET: usize = 256;
/// Smallest vocabulary that holds the byte alphabet and the two special tokens.
pub const MIN_VOCAB_SIZE: usize = BYTE_ALPHABET + 2;
/// Largest vocabulary accepted (the model's embedding tables grow with it).
pub const MAX_VOCAB_SIZE: usize = 1 << 20;

/// Errors of the tokenizer wrapper.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The configuration is out of range.
    #[error("invalid tokenizer config: {0}")]
    Config(String),
    /// Training failed inside the `tokenizers` crate.
    #[error("training the BPE tokenizer failed: {0}; check that the bootstrap rows contain text")]
    Train(String),
    /// The JSON does not describe a usable tokenizer.
    #[error(
        "tokenizer json from {source_name} is not usable: {reason}; pass a byte-level BPE tokenizer.json written by mbtd or Hugging Face tokenizers"
    )]
    Json {
        /// Where the JSON came from (a path or "string").
        source_name: String,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing a tokenizer file failed.
    #[error("tokenizer file {path}: {op} failed: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operation ("read", "write", ...).
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// Encoding or decoding failed inside the `tokenizers` crate.
    #[error("{op} failed: {reason}")]
    Codec {
        /// "encode" or "decode".
        op: &'static str,
        /// The crate's message.
        reason: String,
    },
}

/// Tokenizer settings (`[tokenizer]` in the daemon config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerConfig {
    /// Vocabulary size of the model (`V`); the trained tokenizer has at most this many ids.
    pub vocab_size: usize,
    /// Load this `tokenizer.json` instead of training one.
    pub path: Option<PathBuf>,
    /// Rows of text to collect before training the tokenizer at bootstrap.
    pub bootstrap_rows: usize,
    /// A pair must occur at least this often in the bootstrap rows to become a merge.
    pub min_frequency: u64,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        Self {
            vocab_size: 4096,
            path: None,
            bootstrap_rows: 2000,
            min_frequency: 2,
        }
    }
}

impl TokenizerConfig {
    /// Checks every field; the error names the field and its allowed range.
    pub fn validate(&self) -> Result<(), String> {
        if !(MIN_VOCAB_SIZE..=MAX_VOCAB_SIZE).contains(&self.vocab_size) {
            return Err(format!(
                "tokenizer.vocab_size = {} is out of range: allowed {MIN_VOCAB_SIZE}..={MAX_VOCAB_SIZE} (256 bytes + 2 special tokens at least)",
                self.vocab_size
            ));
        }
        if self.path.is_none() && self.bootstrap_rows == 0 {
            return Err(
                "tokenizer.bootstrap_rows = 0: must be >= 1 when tokenizer.path is not set"
                    .to_string(),
            );
        }
        if self.min_frequency == 0 {
            return Err("tokenizer.min_frequency = 0: must be >= 1".to_string());
        }
        Ok(())
    }
}

/// A frozen byte-level BPE tokenizer with the two mbtd special tokens.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eot: u32,
    response: u32,
}

impl Tokenizer {
    /// Trains a byte-level BPE with at most `vocab_size` ids (special tokens and the 256-byte
    /// alphabet included) on `texts`, with merges seen at least `min_frequency` times.
    pub fn train<I, S>(
        texts: I,
        vocab_size: usize,
        min_frequency: u64,
    ) -> Result<Self, TokenizerError>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        if !(MIN_VOCAB_SIZE..=MAX_VOCAB_SIZE).contains(&vocab_size) {
            return Err(TokenizerError::Config(format!(
                "vocab_size = {vocab_size} is out of range: allowed {MIN_VOCAB_SIZE}..={MAX_VOCAB_SIZE}"
            )));
        }
        let byte_level = ByteLevel::new(false, true, true);
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(min_frequency)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .special_tokens(vec![
                AddedToken::from(EOT_TOKEN, true),
                AddedToken::from(RESPONSE_TOKEN, true),
            ])
            .build();
        let mut built =
            TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>::new()
                .with_model(BPE::default())
                .with_pre_tokenizer(Some(byte_level))
                .with_post_processor(Some(byte_level))
                .with_decoder(Some(byte_level))
                .build()
                .map_err(|e| TokenizerError::Train(e.to_string()))?;
        built
            .train(&mut trainer, texts)
            .map_err(|e| TokenizerError::Train(e.to_string()))?;
        Self::from_inner(tokenizers::Tokenizer::from(built), "training")
    }

    /// Trains with the settings of `cfg` after validating it (`cfg.path` is not looked at:
    /// see [`Self::load_configured`]).
    pub fn train_with_config<I, S>(texts: I, cfg: &TokenizerConfig) -> Result<Self, TokenizerError>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        cfg.validate().map_err(TokenizerError::Config)?;
        Self::train(texts, cfg.vocab_size, cfg.min_frequency)
    }

    /// Loads `cfg.path` if set (`Ok(None)` otherwise) and checks that its ids fit the
    /// model's `cfg.vocab_size`.
    pub fn load_configured(cfg: &TokenizerConfig) -> Result<Option<Self>, TokenizerError> {
        let Some(path) = &cfg.path else {
            return Ok(None);
        };
        let t = Self::load(path)?;
        if t.vocab_size() > cfg.vocab_size {
            return Err(TokenizerError::Json {
                source_name: path.display().to_string(),
                reason: format!(
                    "it has {} ids but tokenizer.vocab_size (the model's vocabulary) is {}; raise tokenizer.vocab_size",
                    t.vocab_size(),
                    cfg.vocab_size
                ),
            });
        }
        Ok(Some(t))
    }

    fn from_inner(
        mut inner: tokenizers::Tokenizer,
        source_name: &str,
    ) -> Result<Self, TokenizerError> {
        let bad = |reason: String| TokenizerError::Json {
            source_name: source_name.to_string(),
            reason,
        };
        let eot = inner
            .token_to_id(EOT_TOKEN)
            .ok_or_else(|| bad(format!("special token {EOT_TOKEN} is missing")))?;
        let response = inner
            .token_to_id(RESPONSE_TOKEN)
            .ok_or_else(|| bad(format!("special token {RESPONSE_TOKEN} is missing")))?;
        // Every byte must have an id, otherwise some input would have no encoding.
        let vocab = inner.get_vocab(false);
        if let Some(missing) = ByteLevel::alphabet()
            .into_iter()
            .find(|c| !vocab.contains_key(&c.to_string()))
        {
            return Err(bad(format!(
                "byte symbol {missing:?} is not in the vocabulary (not a byte-level BPE)"
            )));
        }
        inner.set_encode_special_tokens(true);
        Ok(Self {
            inner,
            eot,
            response,
        })
    }

    /// Encodes `text` to token ids. Special-token text in `text` is encoded as plain bytes.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Codec {
                op: "encode",
                reason: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text; special tokens render as their text. Ids that do not form valid
    /// UTF-8 on their own (a partial multi-byte character) decode with U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size()) {
            return Err(TokenizerError::Codec {
                op: "decode",
                reason: format!(
                    "token id {bad} is out of range: the vocabulary has {} ids",
                    self.vocab_size()
                ),
            });
        }
        self.inner
            .decode(ids, false)
            .map_err(|e| TokenizerError::Codec {
                op: "decode",
                reason: e.to_string(),
            })
    }

    /// Id of `<|endoftext|>`.
    pub fn eot_id(&self) -> u32 {
        self.eot
    }

    /// Id of `<|response|>`.
    pub fn response_id(&self) -> u32 {
        self.response
    }

    /// Number of ids (special tokens included); every id is `< vocab_size()`.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The standard `tokenizer.json` text (pretty-printed).
    pub fn to_json(&self) -> Result<String, TokenizerError> {
        self.inner
            .to_string(true)
            .map_err(|e| TokenizerError::Json {
                source_name: "serialisation".to_string(),
                reason: e.to_string(),
            })
    }

    /// Parses a `tokenizer.json` text; `source_name` says where it came from (for errors).
    pub fn from_json(json: &str, source_name: &str) -> Result<Self, TokenizerError> {
        let bad = |reason: String| TokenizerError::Json {
            source_name: source_name.to_string(),
            reason,
        };
        // Only the byte-level BPE pipeline round-trips every string exactly.
        let v: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        for (part, want) in [
            ("model", "BPE"),
            ("pre_tokenizer", "ByteLevel"),
            ("decoder", "ByteLevel"),
        ] {
            let got = v[part]["type"].as_str().unwrap_or("none");
            if got != want {
                return Err(bad(format!("{part}.type is {got:?}, expected {want:?}")));
            }
        }
        if !v["normalizer"].is_null() {
            return Err(bad(
                "it has a normalizer (text would not round-trip)".to_string()
            ));
        }
        let inner: tokenizers::Tokenizer =
            json.parse()
                .map_err(
                    |e: Box<dyn std::error::Error + Send + Sync>| TokenizerError::Json {
                        source_name: source_name.to_string(),
                        reason: e.to_string(),
                    },
                )?;
        Self::from_inner(inner, source_name)
    }

    /// Writes `tokenizer.json` to `path` durably (temp file, fsync, rename, dir fsync).
    pub fn save(&self, path: &Path) -> Result<(), TokenizerError> {
        let json = self.to_json()?;
        crate::checkpoint::durable::write_file_atomic(path, json.as_bytes()).map_err(|source| {
            TokenizerError::Io {
                path: path.to_path_buf(),
                op: "write",
                source,
            }
        })
    }

    /// Reads a `tokenizer.json` from `path`.
    pub fn load(path: &Path) -> Result<Self, TokenizerError> {
        let json = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            op: "read",
            source,
        })?;
        Self::from_json(&json, &path.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn corpus() -> Vec<String> {
        let base = [
            "the quick brown fox jumps over the lazy dog",
            "Multi-branch transformers grow wider while they train.",
            "Grüße aus Köln — 東京 の 天気 は 晴れ です 🙂",
            "def f(x):\n    return x * 2  # double\n",
            "prices: 12.50 EUR, 99 USD; 3,000 items",
        ];
        (0..40)
            .flat_map(|i| base.iter().map(move |s| format!("{s} {i}")))
            .collect()
    }

    fn trained() -> &'static Tokenizer {
        static TOK: OnceLock<Tokenizer> = OnceLock::new();
        TOK.get_or_init(|| Tokenizer::train(corpus().into_iter(), 400, 2).expect("train"))
    }

    #[test]
    fn specials_have_fixed_ids_and_vocab_is_bounded() {
        let t = trained();
        assert_eq!(t.eot_id(), 0);
        assert_eq!(t.response_id(), 1);
        assert!(t.vocab_size() <= 400, "vocab {}", t.vocab_size());
        // Merges were learned beyond the byte alphabet.
        assert!(t.vocab_size() > MIN_VOCAB_SIZE);
        let ids = t.encode("the quick brown fox").unwrap();
        assert!(
            ids.len() < "the quick brown fox".len(),
            "merges shorten common text"
        );
    }

    #[test]
    fn special_token_text_in_data_is_not_a_special_token() {
        let t = trained();
        let ids = t.encode("a <|endoftext|> b <|response|>").unwrap();
        assert!(!ids.contains(&t.eot_id()));
        assert!(!ids.contains(&t.response_id()));
        assert_eq!(t.decode(&ids).unwrap(), "a <|endoftext|> b <|response|>");
    }

    #[test]
    fn decode_renders_special_ids() {
        let t = trained();
        let mut ids = t.encode("hi").unwrap();
        ids.push(t.response_id());
        ids.extend(t.encode(" there").unwrap());
        ids.push(t.eot_id());
        assert_eq!(t.decode(&ids).unwrap(), "hi<|response|> there<|endoftext|>");
    }

    #[test]
    fn decode_rejects_out_of_range_ids() {
        let t = trained();
        let err = t.decode(&[5, t.vocab_size() as u32]).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
    }

    #[test]
    fn json_round_trip_gives_identical_encodings() {
        let t = trained();
        let json = t.to_json().unwrap();
        let back = Tokenizer::from_json(&json, "test").unwrap();
        assert_eq!(back.vocab_size(), t.vocab_size());
        assert_eq!(back.to_json().unwrap(), json);
        for s in corpus().iter().take(20).chain(
            ["<|endoftext|> x", "ünïcødé ✓"]
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .iter(),
        ) {
            assert_eq!(back.encode(s).unwrap(), t.encode(s).unwrap(), "{s:?}");
        }
        // The standard format: a BPE model with ByteLevel parts and the added tokens.
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["model"]["type"], "BPE");
        assert!(
            v["model"]["unk_token"].is_null(),
            "byte-level BPE needs no unknown token"
        );
        assert_eq!(v["pre_tokenizer"]["type"], "ByteLevel");
        assert_eq!(v["decoder"]["type"], "ByteLevel");
        assert_eq!(v["added_tokens"][0]["content"], EOT_TOKEN);
        assert_eq!(v["added_tokens"][1]["content"], RESPONSE_TOKEN);
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let t = trained();
        t.save(&path).unwrap();
        let back = Tokenizer::load(&path).unwrap();
        assert_eq!(
            back.encode("Grüße 🙂 fox").unwrap(),
            t.encode("Grüße 🙂 fox").unwrap()
        );
    }

    #[test]
    fn load_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.json");
        let err = Tokenizer::load(&missing).unwrap_err().to_string();
        assert!(err.contains("nope.json") && err.contains("read"), "{err}");
        let err = Tokenizer::from_json("{not json", "x.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.json"), "{err}");
        // A tokenizer without the special tokens is refused.
        let json = trained()
            .to_json()
            .unwrap()
            .replace(RESPONSE_TOKEN, "<|other|>");
        let err = Tokenizer::from_json(&json, "y.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains(RESPONSE_TOKEN), "{err}");
        // Not byte-level: refused, naming the part.
        let mut v: serde_json::Value = serde_json::from_str(&trained().to_json().unwrap()).unwrap();
        v["pre_tokenizer"] = serde_json::json!({"type": "Whitespace"});
        let err = Tokenizer::from_json(&v.to_string(), "z.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pre_tokenizer.type") && err.contains("z.json"),
            "{err}"
        );
        let mut v: serde_json::Value = serde_json::from_str(&trained().to_json().unwrap()).unwrap();
        v["normalizer"] = serde_json::json!({"type": "Lowercase"});
        let err = Tokenizer::from_json(&v.to_string(), "n.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("normalizer"), "{err}");
    }

    #[test]
    fn configured_path_must_fit_the_model_vocab() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        trained().save(&path).unwrap();
        let n = trained().vocab_size();
        let cfg = TokenizerConfig {
            path: Some(path.clone()),
            vocab_size: n,
            ..Default::default()
        };
        assert_eq!(
            Tokenizer::load_configured(&cfg)
                .unwrap()
                .unwrap()
                .vocab_size(),
            n
        );
        let small = TokenizerConfig {
            vocab_size: n - 1,
            ..cfg
        };
        let err = Tokenizer::load_configured(&small).unwrap_err().to_string();
        assert!(err.contains("tokenizer.vocab_size"), "{err}");
        assert!(
            Tokenizer::load_configured(&TokenizerConfig::default())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn config_validation_names_fields() {
        assert!(TokenizerConfig::default().validate().is_ok());
        let c = TokenizerConfig {
            vocab_size: 100,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("tokenizer.vocab_size"));
        let c = TokenizerConfig {
            bootstrap_rows: 0,
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .contains("tokenizer.bootstrap_rows")
        );
        let c = TokenizerConfig {
            bootstrap_rows: 0,
            path: Some("t.json".into()),
            ..Default::default()
        };
        assert!(c.validate().is_ok());
        let c: TokenizerConfig = toml::from_str("vocab_size = 512").unwrap();
        assert_eq!(c.vocab_size, 512);
        assert_eq!(c.bootstrap_rows, TokenizerConfig::default().bootstrap_rows);
        assert!(toml::from_str::<TokenizerConfig>("vocab = 512").is_err());
        assert!(Tokenizer::train(corpus().into_iter(), 10, 2).is_err());
        let small = TokenizerConfig {
            vocab_size: 300,
            ..Default::default()
        };
        let t = Tokenizer::train_with_config(corpus().into_iter(), &small).unwrap();
        assert!(t.vocab_size() <= 300);
        let bad = TokenizerConfig {
            min_frequency: 0,
            ..small
        };
        let err = Tokenizer::train_with_config(corpus().into_iter(), &bad).unwrap_err();
        assert!(err.to_string().contains("tokenizer.min_frequency"), "{err}");
    }

    #[test]
    fn training_on_no_text_still_encodes_everything() {
        let t = Tokenizer::train(std::iter::empty::<String>(), 300, 2).unwrap();
        assert_eq!(t.vocab_size(), MIN_VOCAB_SIZE);
        let s = "any text at all, \u{10FFFF} \0";
        let ids = t.encode(s).unwrap();
        assert_eq!(ids.len(), s.len(), "one id per byte without merges");
        assert_eq!(t.decode(&ids).unwrap(), s);
    }

    #[test]
    fn training_is_deterministic() {
        let a = Tokenizer::train(corpus().into_iter(), 350, 2).unwrap();
        let b = Tokenizer::train(corpus().into_iter(), 350, 2).unwrap();
        assert_eq!(a.to_json().unwrap(), b.to_json().unwrap());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(8))]
        #[test]
        fn vocab_never_exceeds_the_target(target in MIN_VOCAB_SIZE..700usize) {
            let t = Tokenizer::train(corpus().into_iter(), target, 1).unwrap();
            prop_assert!(t.vocab_size() <= target);
            prop_assert!(t.vocab_size() >= MIN_VOCAB_SIZE);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn round_trip_arbitrary_unicode(s in any::<String>()) {
            let t = trained();
            let ids = t.encode(&s).unwrap();
            prop_assert!(ids.iter().all(|&id| (id as usize) < t.vocab_size()));
            prop_assert!(!ids.contains(&t.eot_id()) && !ids.contains(&t.response_id()));
            prop_assert_eq!(t.decode(&ids).unwrap(), s);
        }

        #[test]
        fn round_trip_text_like(s in "[a-zA-Z0-9 .,\\n\u{e4}\u{f6}\u{fc}\u{4e00}-\u{4e10}]{0,80}") {
            let t = trained();
            let ids = t.encode(&s).unwrap();
            prop_assert_eq!(t.decode(&ids).unwrap(), s);
        }
    }
}

//! Prompt templates: how a conversation becomes the `generate` request of the next reply.
//!
//! * `mbtd` (the default) is the format the daemon trains on: an inbox row `prompt,response`
//!   becomes `enc(prompt) ‖ <|response|> ‖ enc(response) ‖ <|endoftext|>`. Each message is
//!   sent alone with `respond: true` (the daemon appends `<|response|>`) and the reply ends
//!   at `<|endoftext|>`; earlier turns are not part of the prompt, exactly as rows are
//!   trained one at a time.
//! * `plain`: `User: …\nAssistant: …\n` lines, the whole conversation, continued as text;
//!   the reply stops at `\nUser:`.
//! * `chatml`: `<|im_start|>user\n…<|im_end|>\n<|im_start|>assistant\n…`; stops at
//!   `<|im_end|>`.
//! * `llama3`: `<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n…<|eot_id|>`
//!   and the assistant header; stops at `<|eot_id|>`.
//!
//! The markers of the last three are ordinary text to the daemon's tokenizer (only
//! `<|endoftext|>` and `<|response|>` are special): they work once the model has been
//! trained on text in that format.

use clap::ValueEnum;

/// One exchange: the person's message and the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub prompt: String,
    pub response: String,
}

/// A prompt template (`mbtd chat --template`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Template {
    /// The daemon's own prompt/response format (one turn at a time).
    #[default]
    Mbtd,
    /// `User:` / `Assistant:` lines.
    Plain,
    /// ChatML (`<|im_start|>` … `<|im_end|>`).
    Chatml,
    /// Llama-3 style headers (`<|start_header_id|>` … `<|eot_id|>`).
    Llama3,
}

/// What to send for the next reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub prompt: String,
    /// Whether the daemon appends `<|response|>` (the `mbtd` format).
    pub respond: bool,
}

impl Template {
    /// The request for the reply to `message` after the turns of `history`.
    pub fn render(self, history: &[Turn], message: &str) -> Rendered {
        let mut p = String::new();
        match self {
            Template::Mbtd => {
                return Rendered {
                    prompt: message.to_string(),
                    respond: true,
                };
            }
            Template::Plain => {
                for t in history {
                    p.push_str(&format!("User: {}\nAssistant: {}\n", t.prompt, t.response));
                }
                p.push_str(&format!("User: {message}\nAssistant:"));
            }
            Template::Chatml => {
                let turn =
                    |role: &str, text: &str| format!("<|im_start|>{role}\n{text}<|im_end|>\n");
                for t in history {
                    p.push_str(&turn("user", &t.prompt));
                    p.push_str(&turn("assistant", &t.response));
                }
                p.push_str(&turn("user", message));
                p.push_str("<|im_start|>assistant\n");
            }
            Template::Llama3 => {
                let header = |role: &str| format!("<|start_header_id|>{role}<|end_header_id|>\n\n");
                p.push_str("<|begin_of_text|>");
                for t in history {
                    p.push_str(&format!("{}{}<|eot_id|>", header("user"), t.prompt));
                    p.push_str(&format!("{}{}<|eot_id|>", header("assistant"), t.response));
                }
                p.push_str(&format!("{}{message}<|eot_id|>", header("user")));
                p.push_str(&header("assistant"));
            }
        }
        Rendered {
            prompt: p,
            respond: false,
        }
    }

    /// The stop sequences the format implies (added to `--stop`).
    pub fn stops(self) -> &'static [&'static str] {
        match self {
            Template::Mbtd => &[],
            Template::Plain => &["\nUser:"],
            Template::Chatml => &["<|im_end|>"],
            Template::Llama3 => &["<|eot_id|>"],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history() -> Vec<Turn> {
        vec![Turn {
            prompt: "hi".into(),
            response: "hello".into(),
        }]
    }

    #[test]
    fn mbtd_sends_the_message_alone_as_an_instruction() {
        let r = Template::Mbtd.render(&history(), "What is 2+3?");
        assert_eq!(
            r,
            Rendered {
                prompt: "What is 2+3?".into(),
                respond: true
            }
        );
        assert!(Template::Mbtd.stops().is_empty());
    }

    #[test]
    fn conversation_templates_render_every_turn_then_open_the_reply() {
        let h = history();
        assert_eq!(
            Template::Plain.render(&h, "more").prompt,
            "User: hi\nAssistant: hello\nUser: more\nAssistant:"
        );
        assert_eq!(
            Template::Chatml.render(&h, "more").prompt,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n\
             <|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            Template::Llama3.render(&[], "q").prompt,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nq<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        for t in [Template::Plain, Template::Chatml, Template::Llama3] {
            let r = t.render(&h, "more");
            assert!(!r.respond);
            // A reply that ends with the template's stop is cut where the next turn starts.
            let stop = t.stops()[0];
            assert!(
                r.prompt.contains(stop.trim_start_matches('\n')),
                "{t:?}: a rendered history uses its own stop marker"
            );
        }
    }
}

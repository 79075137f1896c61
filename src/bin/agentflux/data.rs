//! `agentflux data`: training data for the decoupled adapters.

use agentflux::gguf::GgufFile;
use agentflux::resolve_model;
use agentflux::text::{ChatTemplate, Tokenizer};
use agentflux::toolcall::{ToolCaller, MAX_RESULT_CHARS};
use agentflux::train::{decoupled_examples, examples::counts, read_trajectories, split, AdapterRole};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Validate trajectories (OpenAI chat JSONL with tool calls), report what is dropped and
    /// why, count the decoupled examples per adapter, and optionally write a seeded split.
    Check(CheckArgs),
}

#[derive(clap::Args)]
pub struct CheckArgs {
    /// The model whose tokenizer and chat template lay out the examples (no GPU needed).
    #[arg(long, default_value = "default")]
    model: String,
    /// Longest training sequence in tokens; longer conversations are dropped.
    #[arg(long, default_value_t = 2048)]
    max_tokens: usize,
    /// Seed of the 80/10/10 split.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write train.jsonl, val.jsonl, test.jsonl (the kept lines) and report.txt here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The trajectories.
    file: PathBuf,
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Check(a) => check(a),
    }
}

fn check(a: CheckArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let path = resolve_model(&a.model)?;
    let f = GgufFile::open(&path)?;
    let tok = Arc::new(Tokenizer::from_gguf(&f)?);
    let template = ChatTemplate::from_gguf(&f, &tok)?;
    let caller = ToolCaller::new(tok, template)?;
    let (trajectories, mut report) = read_trajectories(&text, MAX_RESULT_CHARS);
    let examples = decoupled_examples(&caller, &trajectories, a.max_tokens, &mut report)?;
    let mut out = report.summary(3);
    out.push_str(&format!("{} examples (sequences of up to {} tokens):\n", examples.len(), examples.iter().map(|e| e.tokens.len()).max().unwrap_or(0)));
    for (role, (n, targets)) in counts(&examples) {
        let name = match role {
            AdapterRole::Selector => "selector".to_string(),
            AdapterRole::Arguments(t) => format!("arguments of {t}"),
        };
        out.push_str(&format!("  {name}: {n} examples, {targets} target tokens\n"));
    }
    let dropped: std::collections::HashSet<usize> = report.dropped.iter().map(|d| d.line).collect();
    let kept: Vec<usize> = trajectories.iter().map(|t| t.line).filter(|l| !dropped.contains(l)).collect();
    let parts = split(kept, a.seed);
    out.push_str(&format!("split (seed {}): {} train, {} val, {} test\n", a.seed, parts.train.len(), parts.val.len(), parts.test.len()));
    print!("{out}");
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let lines: Vec<&str> = text.lines().collect();
        for (name, part) in [("train", &parts.train), ("val", &parts.val), ("test", &parts.test)] {
            let body: String = part.iter().map(|&l| format!("{}\n", lines[l - 1])).collect();
            let p = dir.join(format!("{name}.jsonl"));
            std::fs::write(&p, body).with_context(|| format!("writing {}", p.display()))?;
        }
        std::fs::write(dir.join("report.txt"), &out).with_context(|| format!("writing {}", dir.join("report.txt").display()))?;
        eprintln!("wrote {}/{{train,val,test}}.jsonl and report.txt", dir.display());
    }
    Ok(())
}

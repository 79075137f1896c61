//! `agentflux data`: training data for the decoupled adapters.

use crate::train::ArgsActivation;
use agentflux::gguf::GgufFile;
use agentflux::mcp::{McpClient, ServerOptions};
use agentflux::resolve_model;
use agentflux::text::{ChatTemplate, Tokenizer};
use agentflux::toolcall::{ToolCaller, MAX_RESULT_CHARS};
use agentflux::train::{examples::counts, read_trajectories, split_examples, synthesize, AdapterRole, Seed, SynthOptions};
use anyhow::{Context, Result};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Validate trajectories (OpenAI chat JSONL with tool calls), report what is dropped and
    /// why, count the decoupled examples per adapter, and optionally write a seeded split.
    Check(CheckArgs),
    /// Make trajectories offline for a tool set: requests drawn from its seed file (phrasings
    /// in several styles, realistic argument values, chains of calls, requests without a tool),
    /// each call run on the real MCP server in a sandbox workspace, its real result fed back.
    Synth(SynthArgs),
}

#[derive(clap::Args)]
pub struct SynthArgs {
    /// The tool set's seed file.
    #[arg(long, default_value = "adapters/filesystem/data/seed.json")]
    seed_file: PathBuf,
    /// Conversations to write.
    #[arg(long, default_value_t = 400)]
    conversations: usize,
    /// Most user requests per conversation.
    #[arg(long, default_value_t = 3)]
    max_steps: usize,
    /// Share of conversations whose files sit in folders of varied shapes below the workspace
    /// (`tmp.x7Qz…`, dashes, dots, digits, spaces, nesting), 0 to 1.
    #[arg(long, default_value_t = 0.5)]
    shaped_roots: f64,
    /// Share of requests, of a tool or chain whose seed lists `mistakes` (and no `mistake_rate`
    /// of its own), that first make one of them: the server's error comes back, then the right
    /// calls (the selector's recoveries).
    #[arg(long, default_value_t = 0.1)]
    mistake_rate: f64,
    /// Share of requests served by a chain of calls from the seed's `chains` (the rest: a single
    /// call, or no tool at all in about one request of eight), 0 to 1.
    #[arg(long, default_value_t = 0.15)]
    chain_rate: f64,
    /// Random seed (the same seed and seed file give the same data).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The sandbox workspace the server runs in; its contents are replaced before every
    /// conversation.
    #[arg(long, default_value = "/tmp/agentflux-ws")]
    workspace: PathBuf,
    /// Allow replacing the contents of a workspace directory that is not empty.
    #[arg(long)]
    replace_workspace: bool,
    /// Server command instead of the seed's (`{ws}` is replaced by the workspace).
    #[arg(long)]
    mcp: Option<String>,
    /// Where to write the JSONL (written to OUT.part, renamed to OUT when complete).
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
pub struct CheckArgs {
    /// The model whose tokenizer and chat template lay out the examples (no GPU needed).
    #[arg(long, default_value = "default")]
    model: String,
    /// Longest training sequence in tokens; longer conversations are dropped.
    #[arg(long, default_value_t = 2048)]
    max_tokens: usize,
    /// Seed of the split (about 80/10/10, each line placed by a hash of its text and this seed).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where argument examples' active rows start, as `agentflux train --args-activation`.
    #[arg(long, value_enum, default_value_t = ArgsActivation::Schema)]
    args_activation: ArgsActivation,
    /// Write train.jsonl, val.jsonl, test.jsonl (the kept lines) and report.txt here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the training split's examples here as JSONL, one per line: `adapter` (`selector`
    /// or the tool), `line`, `tokens`, `active_from` and the target ranges — what `agentflux
    /// train` trains on, for other trainers (tools/train-vs-peft).
    #[arg(long)]
    examples: Option<PathBuf>,
    /// The trajectories.
    file: PathBuf,
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Check(a) => check(a),
        Command::Synth(a) => synth(a),
    }
}

impl SynthArgs {
    /// `agentflux data synth --seed-file SEED --out OUT` with every other option at its default.
    pub fn with_defaults(seed_file: &std::path::Path, out: &std::path::Path) -> Result<Self> {
        use clap::{Args, FromArgMatches};
        let argv = [std::ffi::OsStr::new("synth"), "--seed-file".as_ref(), seed_file.as_os_str(), "--out".as_ref(), out.as_os_str()];
        let matches = Self::augment_args(clap::Command::new("synth")).try_get_matches_from(argv)?;
        Ok(Self::from_arg_matches(&matches)?)
    }
}

/// `agentflux data synth`.
pub fn synth(a: SynthArgs) -> Result<()> {
    for (flag, share) in [("--shaped-roots", a.shaped_roots), ("--mistake-rate", a.mistake_rate), ("--chain-rate", a.chain_rate)] {
        if !(0.0..=1.0).contains(&share) {
            anyhow::bail!("{flag} {share}: a share between 0 and 1");
        }
    }
    let seed = Seed::load(&a.seed_file)?;
    let opts = SynthOptions {
        conversations: a.conversations,
        max_steps: a.max_steps,
        shaped_roots: a.shaped_roots,
        mistake_rate: a.mistake_rate,
        chain_rate: a.chain_rate,
        seed: a.seed,
        workspace: a.workspace.clone(),
        ..Default::default()
    };
    let occupied = std::fs::read_dir(&opts.workspace).map(|mut d| d.next().is_some()).unwrap_or(false);
    if occupied && !a.replace_workspace {
        anyhow::bail!(
            "{} is not empty; synth replaces a workspace's contents before every conversation. Pass --replace-workspace to allow it, or choose an empty --workspace",
            opts.workspace.display()
        );
    }
    // The server starts in the workspace, so it must exist with its files first.
    seed.reset_workspace(&opts.workspace)?;
    let command =
        a.mcp.as_deref().map_or_else(|| seed.server_command(&opts.workspace), |c| c.replace("{ws}", &opts.workspace.to_string_lossy()));
    let mut server =
        McpClient::spawn(&command, ServerOptions::default()).with_context(|| format!("starting the tool server `{command}`"))?;
    // Written aside and renamed when complete: a run that fails or is interrupted leaves OUT as
    // it was, never a part of the data in its place.
    let part = {
        let mut p = a.out.clone().into_os_string();
        p.push(".part");
        PathBuf::from(p)
    };
    let mut out = std::io::BufWriter::new(std::fs::File::create(&part).with_context(|| format!("creating {}", part.display()))?);
    let started = std::time::Instant::now();
    let mut progress = crate::progress::ProgressLine::new(opts.conversations as u64);
    let report = synthesize(&seed, &mut server, &opts, |i, line| {
        writeln!(out, "{line}").map_err(|e| agentflux::Error::io(&part, e))?;
        let done = i + 1;
        progress.update(done as u64, false, || {
            format!("[synth] conversation {done}/{} · {:.0} s", opts.conversations, started.elapsed().as_secs_f64())
        });
        Ok(())
    });
    let written = report.and_then(|r| out.flush().map(|_| r).map_err(|e| agentflux::Error::io(&part, e)));
    drop(out);
    let report = match written {
        Ok(r) => r,
        Err(e) => {
            std::fs::remove_file(&part).ok();
            return Err(e.into());
        }
    };
    std::fs::rename(&part, &a.out).with_context(|| format!("renaming {} to {}", part.display(), a.out.display()))?;
    progress.finish();
    print!("{}", report.summary());
    eprintln!("wrote {} ({} conversations in {:.0} s)", a.out.display(), report.conversations, started.elapsed().as_secs_f64());
    Ok(())
}

fn check(a: CheckArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let path = resolve_model(&a.model)?;
    let f = GgufFile::open(&path)?;
    let tok = Arc::new(Tokenizer::from_gguf(&f)?);
    let template = ChatTemplate::from_gguf(&f, &tok)?;
    let caller = ToolCaller::new(tok, template)?;
    let (trajectories, mut report) = read_trajectories(&text, MAX_RESULT_CHARS);
    let parts = split_examples(&caller, trajectories, a.seed, a.max_tokens, a.args_activation.into(), &mut report)?;
    let examples: Vec<&agentflux::train::Example> = [&parts.train, &parts.val, &parts.test].into_iter().flat_map(|p| &p.examples).collect();
    let mut out = report.summary(3);
    out.push_str(&format!(
        "{} examples (sequences of up to {} tokens):\n",
        examples.len(),
        examples.iter().map(|e| e.tokens.len()).max().unwrap_or(0)
    ));
    for (role, (n, targets)) in counts(examples.iter().copied()) {
        let name = match &role {
            AdapterRole::Arguments(t) => format!("arguments of {t}"),
            _ => role.name().to_string(),
        };
        out.push_str(&format!("  {name}: {n} examples, {targets} target tokens\n"));
    }
    out.push_str(&format!(
        "split (seed {}): {} train, {} val, {} test\n",
        a.seed,
        parts.train.lines.len(),
        parts.val.lines.len(),
        parts.test.lines.len()
    ));
    print!("{out}");
    if let Some(path) = &a.examples {
        let body: String = parts
            .train
            .examples
            .iter()
            .map(|e| {
                let adapter = e.role.name();
                let targets: Vec<[usize; 2]> = e.targets.iter().map(|r| [r.start, r.end]).collect();
                format!("{}\n", serde_json::json!({"adapter": adapter, "line": e.line, "tokens": e.tokens, "active_from": e.active_from, "targets": targets}))
            })
            .collect();
        std::fs::write(path, body).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote the training split's examples to {}", path.display());
    }
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let lines: Vec<&str> = text.lines().collect();
        for (name, part) in [("train", &parts.train), ("val", &parts.val), ("test", &parts.test)] {
            let body: String = part.lines.iter().map(|&l| format!("{}\n", lines[l - 1])).collect();
            let p = dir.join(format!("{name}.jsonl"));
            std::fs::write(&p, body).with_context(|| format!("writing {}", p.display()))?;
        }
        std::fs::write(dir.join("report.txt"), &out).with_context(|| format!("writing {}", dir.join("report.txt").display()))?;
        eprintln!("wrote {}/{{train,val,test}}.jsonl and report.txt", dir.display());
    }
    Ok(())
}

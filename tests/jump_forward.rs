//! Jump-forward decoding of arguments: the tokens a tool's schema forces are appended in one
//! forward pass per run, and the call is token for token the step-by-step call — on every tool of
//! the real filesystem and memory servers, with the real tokenizer on a tiny random transformer.

mod common;

use agentflux::session::Session;
use agentflux::text::ChatMessage;
use agentflux::toolcall::{AdapterSet, CallEvent, ToolCaller, ToolChoice};
use common::{default_model, filesystem_and_memory, filesystem_server, rng, tiny_pipeline};
use std::ops::ControlFlow;

#[test]
fn jump_forward_writes_the_step_by_step_arguments_in_fewer_passes() {
    let (Some(f), Some(fs)) = (default_model(), filesystem_server()) else { return };
    let mut r = rng("jump-forward");
    let (model, tok, template, _) = tiny_pipeline(&f, r.next_u64(), "jump-forward");
    let root = std::env::temp_dir().join(format!("agentflux-jump-{}", std::process::id()));
    let catalog = filesystem_and_memory(&fs, &root);
    let messages = [ChatMessage::new("user", &format!("Look after the files in {} and remember what you find.", root.display()))];
    let mut caller = ToolCaller::new(tok, template).unwrap();
    // A context with room for the prompt and a call's argument budget.
    let mut session = Session::new(&model, 2048).unwrap();
    let (mut passes, mut stepwise_passes, mut forced, mut compared) = (0, 0, 0, 0);
    let names = catalog.names().iter().map(|n| n.to_string()).collect::<Vec<_>>();
    assert!(names.len() >= 20, "{names:?}");
    for name in &names {
        let mut run = |jump: bool| {
            caller.set_jump_forward(jump);
            let mut tokens = Vec::new();
            let call =
                caller.call_with(&mut session, &catalog, &messages, &AdapterSet::default(), &ToolChoice::Function(name.clone()), |e| {
                    if let CallEvent::ArgumentToken(t) = e {
                        tokens.push(t);
                    }
                    ControlFlow::Continue(())
                });
            (call.map_err(|e| e.to_string()), tokens)
        };
        let (step, step_tokens) = run(false);
        let (jump, jump_tokens) = run(true);
        assert_eq!(jump_tokens, step_tokens, "{name}: jump-forward changed the tokens");
        // A random model may fill a long array of long strings up to the argument budget: the
        // same error, after the same tokens, either way.
        let (step, jump) = match (step, jump) {
            (Ok(step), Ok(jump)) => (step, jump),
            (step, jump) => {
                assert_eq!(step.map(|c| c.arguments), jump.map(|c| c.arguments), "{name}");
                continue;
            }
        };
        assert_eq!(jump.arguments, step.arguments, "{name}");
        assert_eq!(step.stats.arg_forced, 0);
        // Step by step: the prompt's pass, then one per token fed back (all but a last one that
        // completes the value).
        let t = step.stats.arg_tokens;
        assert!([t, t + 1].contains(&step.stats.arg_passes), "{name}: {} passes for {t} tokens", step.stats.arg_passes);
        assert!(jump.stats.arg_passes <= step.stats.arg_passes, "{name}");
        passes += jump.stats.arg_passes;
        stepwise_passes += step.stats.arg_passes;
        forced += jump.stats.arg_forced;
        compared += 1;
    }
    eprintln!(
        "{compared} of {} tools finished: {forced} forced tokens kept; {passes} passes against {stepwise_passes} step by step",
        names.len()
    );
    assert!(compared * 2 > names.len(), "most calls finish");
    assert!(forced > 0 && passes < stepwise_passes);
    std::fs::remove_dir_all(&root).unwrap();
}

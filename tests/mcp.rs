//! The MCP client against real servers (`@modelcontextprotocol/server-filesystem` and
//! `server-memory`, installed by tools/setup into tools/mcp/node_modules) and against a
//! fault-injecting server (tests/fixtures/mcp/fault_server.py): every failure is a clear error,
//! within its deadline, and no server process is left behind.

use agentflux::mcp::{McpClient, McpError, ServerOptions};
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn quick() -> ServerOptions {
    ServerOptions { init_timeout: Duration::from_secs(20), request_timeout: Duration::from_secs(2) }
}

fn fault(mode: &str) -> String {
    format!("python3 {}/tests/fixtures/mcp/fault_server.py {mode}", env!("CARGO_MANIFEST_DIR"))
}

/// A server bin from tools/mcp/node_modules, or `None` (skipped) outside CI when not installed.
fn node_server(bin: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/mcp/node_modules/.bin").join(bin);
    if p.exists() {
        return Some(p);
    }
    assert!(std::env::var("CI").is_err(), "{} is missing under CI: tools/setup installs it", p.display());
    eprintln!("SKIPPED: {} not installed (run tools/setup)", p.display());
    None
}

/// Whether process `pid` is gone (reaped: no /proc entry, not even a zombie).
fn gone(pid: u32) -> bool {
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn lists_pages_and_calls_tools() {
    let mut c = McpClient::spawn(&fault("ok"), quick()).unwrap();
    assert_eq!(c.name(), "fault-server");
    assert_eq!(c.protocol_version, agentflux::mcp::PROTOCOL_VERSIONS[0]);
    let tools = c.list_tools().unwrap();
    assert_eq!(tools.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["echo", "add"], "both pages, in order");
    assert_eq!(tools[1].input_schema["required"], json!(["a", "b"]));
    assert_eq!(c.call_tool("add", &json!({"a": 2, "b": 40})).unwrap().text(), "42");
    let unknown = c.call_tool("nope", &json!({})).unwrap();
    assert!(unknown.is_error && unknown.text().contains("unknown tool"));
    let pid = c.pid().expect("a stdio server is a child process");
    drop(c);
    assert!(gone(pid), "the server is reaped on drop");
}

#[test]
fn faults_are_clear_errors_and_leave_no_process() {
    let expect = |mode: &str, needles: &[&str]| {
        let t = Instant::now();
        let (pid, err) = match McpClient::spawn(&fault(mode), quick()) {
            Err(e) => (None, e),
            Ok(mut c) => {
                let pid = c.pid().expect("a stdio server is a child process");
                let err = c.list_tools().and_then(|_| c.call_tool("echo", &json!({"text": "hi"}))).expect_err(mode);
                drop(c);
                (Some(pid), err)
            }
        };
        let msg = err.to_string();
        for n in needles {
            assert!(msg.contains(n), "{mode}: error '{msg}' should mention '{n}'");
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{mode}: took {:?}", t.elapsed());
        if let Some(pid) = pid {
            assert!(gone(pid), "{mode}: server process {pid} left behind");
        }
        err
    };
    assert!(matches!(
        expect("crash", &["closed the connection during tools/call", "exit status: 3", "crashing on purpose"]),
        McpError::Closed { .. }
    ));
    assert!(matches!(expect("hang", &["did not answer tools/call within 2 s"]), McpError::Timeout { .. }));
    assert!(matches!(expect("garbage", &["not JSON-RPC", "this is not json"]), McpError::Garbage { .. }));
    assert!(matches!(expect("close", &["closed the connection during tools/list", "closing stdout on purpose"]), McpError::Closed { .. }));
    assert!(matches!(expect("version", &["1999-01-01", "2025-06-18"]), McpError::Protocol { .. }));
    assert!(matches!(expect("rpc-error", &["refused tools/call", "bad arguments", "-32602"]), McpError::Rpc { .. }));
    let missing = McpClient::spawn("/nonexistent/server --flag", quick()).err().unwrap().to_string();
    assert!(missing.contains("/nonexistent/server") && missing.contains("could not be started"), "{missing}");
    // A relative path that is not there says where it was looked for.
    let relative = McpClient::spawn("no/such/server", quick()).err().unwrap().to_string();
    let cwd = std::env::current_dir().unwrap();
    assert!(relative.contains("no/such/server") && relative.contains(&format!("working directory {}", cwd.display())), "{relative}");
}

#[test]
fn real_filesystem_server_reads_writes_and_lists() {
    let Some(bin) = node_server("mcp-server-filesystem") else { return };
    let root = std::env::temp_dir().join(format!("agentflux-mcp-fs-{}", std::process::id()));
    std::fs::create_dir_all(root.join("notes")).unwrap();
    std::fs::write(root.join("notes/todo.txt"), "buy milk\n").unwrap();
    let root = root.canonicalize().unwrap();
    let mut c = McpClient::spawn(&format!("{} {}", bin.display(), root.display()), ServerOptions::default()).unwrap();
    let tools = c.list_tools().unwrap();
    for name in ["read_text_file", "write_file", "list_directory", "create_directory", "move_file", "search_files", "get_file_info"] {
        let t = tools.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no tool {name} in {tools:?}"));
        assert_eq!(t.input_schema["type"], "object", "{name}");
    }
    let read = c.call_tool("read_text_file", &json!({"path": root.join("notes/todo.txt")})).unwrap();
    assert!(!read.is_error && read.text().contains("buy milk"), "{read:?}");
    let wrote = c.call_tool("write_file", &json!({"path": root.join("notes/new.txt"), "content": "hello"})).unwrap();
    assert!(!wrote.is_error, "{wrote:?}");
    assert_eq!(std::fs::read_to_string(root.join("notes/new.txt")).unwrap(), "hello");
    let listed = c.call_tool("list_directory", &json!({"path": root.join("notes")})).unwrap();
    assert!(listed.text().contains("new.txt") && listed.text().contains("todo.txt"), "{listed:?}");
    // Outside the allowed root: the tool reports an error; the session goes on.
    let denied = c.call_tool("read_text_file", &json!({"path": "/etc/hostname"})).unwrap();
    assert!(denied.is_error, "{denied:?}");
    assert!(!c.call_tool("list_directory", &json!({"path": root})).unwrap().is_error);
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn real_memory_server_stores_entities() {
    let Some(bin) = node_server("mcp-server-memory") else { return };
    let file = std::env::temp_dir().join(format!("agentflux-mcp-memory-{}.jsonl", std::process::id()));
    let mut c = McpClient::spawn(&format!("env MEMORY_FILE_PATH={} {}", file.display(), bin.display()), ServerOptions::default()).unwrap();
    let tools = c.list_tools().unwrap();
    assert!(tools.iter().any(|t| t.name == "create_entities") && tools.iter().any(|t| t.name == "search_nodes"), "{tools:?}");
    let made = c
        .call_tool(
            "create_entities",
            &json!({"entities": [{"name": "Ada", "entityType": "person", "observations": ["wrote the first program"]}]}),
        )
        .unwrap();
    assert!(!made.is_error, "{made:?}");
    let found = c.call_tool("search_nodes", &json!({"query": "Ada"})).unwrap();
    assert!(found.text().contains("first program"), "{found:?}");
    std::fs::remove_file(&file).ok();
}

/// The multi-server dev set (adapters/multi/data/dev.jsonl, for hierarchical against flat
/// selection) names real tools of its four real servers, with arguments valid for their schemas,
/// and asks something of every server.
#[test]
fn multi_server_dev_set_is_valid_for_its_real_servers() {
    use agentflux::toolcall::schema;
    let Some(_) = node_server("mcp-server-everything") else { return };
    let ws = std::env::temp_dir().join(format!("agentflux-multi-dev-{}", std::process::id()));
    std::fs::create_dir_all(&ws).unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{root}/adapters/multi/data/dev.jsonl")).unwrap().replace("{ws}", &ws.to_string_lossy());
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let commands: Vec<String> = lines[0]["mcp"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_string()).collect();
    assert_eq!(commands.len(), 4);
    let mut servers = Vec::new();
    for cmd in &commands {
        let mut c = McpClient::spawn(&format!("{root}/{cmd}"), quick()).unwrap();
        servers.push((c.name(), c.list_tools().unwrap()));
    }
    let mut asked = std::collections::BTreeSet::new();
    for (i, v) in lines.iter().enumerate() {
        assert_eq!(v["mcp"].as_array().unwrap().len(), 4, "line {}", i + 1);
        let name = v["expected"]["name"].as_str().unwrap();
        if name == "finish" {
            continue;
        }
        let (server, tool) = servers
            .iter()
            .find_map(|(s, tools)| tools.iter().find(|t| t.name == name).map(|t| (s, t)))
            .unwrap_or_else(|| panic!("line {}: no server has {name}", i + 1));
        schema::validate(&v["expected"]["arguments"], &tool.input_schema).unwrap_or_else(|e| panic!("line {}: {name}: {e}", i + 1));
        asked.insert(server.clone());
    }
    assert_eq!(asked.len(), 4, "every server is asked something: {asked:?}");
    std::fs::remove_dir_all(&ws).ok();
}

/// Processes whose command line holds `marker` (from /proc).
#[cfg(target_os = "linux")]
fn processes_with(marker: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker)))
        .collect()
}

/// A server behind a wrapper (`sh -c`, as npx and uvx wrap theirs) is stopped with everything it
/// started: one that writes garbage, one that never answers `initialize`, and a working one
/// dropped — no grandchild is left running.
#[cfg(target_os = "linux")]
#[test]
fn a_wrapped_server_is_stopped_with_its_whole_process_group() {
    let opts = ServerOptions { init_timeout: Duration::from_secs(2), request_timeout: Duration::from_secs(2) };
    let ok = fault("ok");
    let cases = [
        ("garbage", "sh -c 'sleep 1001.25 & echo garbage; sleep 1001.5'".to_string()),
        ("silent", "sh -c 'sleep 1002.25 & sleep 1002.5'".to_string()),
        ("working", format!("sh -c 'sleep 1003.25 & exec {ok}'")),
    ];
    for (what, command) in cases {
        let marker = command.split("sleep ").nth(1).unwrap().split(' ').next().unwrap().to_string();
        match McpClient::spawn(&command, opts.clone()) {
            Ok(c) => {
                assert_eq!(what, "working");
                assert_eq!(processes_with(&marker).len(), 1, "{what}: the grandchild runs while the server does");
                drop(c);
            }
            Err(e) => assert_ne!(what, "working", "{e}"),
        }
        // SIGKILL is delivered at once, but the orphans' reaping by init may take a moment.
        let t = Instant::now();
        while !processes_with(&marker).is_empty() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(processes_with(&marker).is_empty(), "{what}: {:?} left running", processes_with(&marker));
    }
}

/// A server's stdout is untrusted: random bytes, bytes that are not UTF-8, and a line that never
/// ends are each a typed error within the deadline (the endless line is cut at its bound, not read
/// into memory whole).
#[test]
fn a_server_writing_noise_is_a_clear_error() {
    let opts = ServerOptions { init_timeout: Duration::from_secs(5), request_timeout: Duration::from_secs(2) };
    for (what, command, needle) in [
        ("random bytes", "sh -c 'head -c 4000 /dev/urandom; echo; sleep 30'", "not JSON-RPC"),
        ("not UTF-8", "sh -c 'printf \"\\377\\376{}\\n\"; sleep 30'", "not JSON-RPC"),
        ("an endless line", "sh -c 'head -c 20000000 /dev/zero | tr \"\\0\" x; sleep 30'", "a line of more than 16777216 bytes"),
    ] {
        let t = Instant::now();
        let err = McpClient::spawn(command, opts.clone()).err().unwrap_or_else(|| panic!("{what}: the server was accepted"));
        let msg = err.to_string();
        assert!(matches!(err, McpError::Garbage { .. }) && msg.contains(needle), "{what}: {msg}");
        assert!(msg.len() < 4000, "{what}: the error quotes at most the start of the line ({} bytes)", msg.len());
        assert!(t.elapsed() < Duration::from_secs(10), "{what}: took {:?}", t.elapsed());
    }
}

/// A server killed from outside while a call waits on it: the call fails at once with the
/// connection closed (not at its 30 s deadline), and the client reaps the process.
#[cfg(target_os = "linux")]
#[test]
fn a_server_killed_mid_call_fails_the_call_at_once() {
    let mut c = McpClient::spawn(&fault("hang"), ServerOptions::default()).unwrap();
    c.list_tools().unwrap();
    let pid = c.pid().expect("a stdio server is a child process");
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        let killed = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
        assert!(killed.success());
    });
    let t = Instant::now();
    let err = c.call_tool("echo", &json!({"text": "hi"})).expect_err("the server was killed");
    killer.join().unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "the call waited {:?}", t.elapsed());
    assert!(matches!(err, McpError::Closed { .. }), "{err}");
    assert!(err.to_string().contains("closed the connection during tools/call"), "{err}");
    drop(c);
    assert!(gone(pid), "the killed server {pid} was not reaped");
}

/// A free loopback port (bound, then released for a server to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The real `server-everything` reached over Streamable HTTP (its `streamableHttp` mode, the
/// official TypeScript SDK's transport: sessions, SSE answers) gives the tools and the results it
/// gives over stdio; a tool error is a result; a wrong URL or a refused request is a clear error;
/// the session ends with the client.
#[test]
fn a_server_over_streamable_http_answers_as_over_stdio() {
    use agentflux::mcp::HttpEndpoint;
    use std::io::BufRead;
    let Some(bin) = node_server("mcp-server-everything") else { return };
    let port = free_port();
    let mut server = std::process::Command::new(&bin)
        .arg("streamableHttp")
        .env("PORT", port.to_string())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It says when it listens.
    let mut stderr = std::io::BufReader::new(server.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("listening") {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "server-everything exited before listening");
    }
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let endpoint = HttpEndpoint { url: format!("http://127.0.0.1:{port}/mcp"), headers: vec![("X-Test".into(), "1".into())] };
    let mut http = McpClient::connect(&endpoint, quick()).unwrap();
    let mut stdio = McpClient::spawn(&format!("{} stdio", bin.display()), quick()).unwrap();
    assert_eq!(http.name(), stdio.name());
    assert_eq!(http.protocol_version, stdio.protocol_version);
    assert_eq!(http.pid(), None);
    let (tools, want) = (http.list_tools().unwrap(), stdio.list_tools().unwrap());
    assert_eq!(tools, want, "the same tools over both transports");
    assert!(tools.len() > 5, "{} tools", tools.len());
    for (name, args) in [("echo", json!({"message": "over http"})), ("get-sum", json!({"a": 2, "b": 40}))] {
        assert!(tools.iter().any(|t| t.name == name), "server-everything has no {name}");
        let (got, want) = (http.call_tool(name, &args).unwrap(), stdio.call_tool(name, &args).unwrap());
        assert_eq!(got, want, "{name}");
        assert!(!got.is_error && !got.text().is_empty(), "{name}: {got:?}");
    }
    let missing = http.call_tool("no-such-tool", &json!({}));
    assert!(matches!(&missing, Ok(r) if r.is_error) || matches!(&missing, Err(McpError::Rpc { .. })), "{missing:?}");
    drop(http);
    // Nothing listens at a wrong path: a clear error naming HTTP and the status.
    let wrong = HttpEndpoint { url: format!("http://127.0.0.1:{port}/nope"), headers: vec![] };
    let e = McpClient::connect(&wrong, quick()).err().expect("a refusal").to_string();
    assert!(e.contains("over HTTP") && e.contains("404"), "{e}");
    let e = McpClient::connect(&HttpEndpoint { url: format!("http://127.0.0.1:{}/mcp", free_port()), headers: vec![] }, quick())
        .err()
        .expect("nothing listens")
        .to_string();
    assert!(e.contains("127.0.0.1"), "{e}");
    server.kill().ok();
    server.wait().ok();
}

/// The official MCP conformance suite (`@modelcontextprotocol/conformance`, tools/mcp) drives the
/// hidden `agentflux mcp-conformance` through every client scenario that applies to a client
/// without OAuth or elicitation: `initialize`, `tools_call` and `sse-retry` (a stream cut before
/// its answer, resumed with `Last-Event-ID` after the `retry` delay). Node.js 24, which the suite
/// needs, comes from tools/clients (tools/setup).
#[test]
fn the_mcp_conformance_suite_passes_its_client_scenarios() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let (node, suite) =
        (root.join("tools/clients/.venv/bin/node"), root.join("tools/mcp/node_modules/@modelcontextprotocol/conformance/dist/index.js"));
    if !node.exists() || !suite.exists() {
        assert!(std::env::var("CI").is_err(), "{} or {} is missing under CI: tools/setup installs them", node.display(), suite.display());
        eprintln!("SKIPPED: the conformance suite or Node.js 24 is not installed (run tools/setup)");
        return;
    }
    let work = std::env::temp_dir().join(format!("agentflux-conformance-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    for scenario in ["initialize", "tools_call", "sse-retry"] {
        let out = std::process::Command::new(&node)
            .arg(&suite)
            .args(["client", "--command", &format!("{} mcp-conformance", env!("CARGO_BIN_EXE_agentflux")), "--scenario", scenario])
            .current_dir(&work)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("OVERALL: PASSED"), "{scenario}:\n{text}");
        let passed = text.lines().find(|l| l.starts_with("Passed:")).unwrap_or("?");
        eprintln!("{scenario}: {passed}");
    }
    std::fs::remove_dir_all(&work).ok();
}

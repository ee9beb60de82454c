//! Connections to the outside (`--unix`, `--tty`): real servers, clients, a broker and tmux on both
//! hosts. Paths are under the testbed's `hostlocal` directory, which is private to b: the same path
//! names a's server on a and b's on b.

use std::time::Duration;

use libtest_mimic::Failed;
use tests::{unique, wait_until};

use super::{check, freezes, tb};

fn local(name: &str) -> String {
    tb().hostlocal().join(format!("{name}-{}", unique())).to_str().expect("utf8").to_string()
}

/// `migrate --json [FLAGS...] PID b` on a.
fn migrate(pid: u32, flags: &[&str]) -> tests::MigrateResult {
    tb().migrate_with("a", pid, &tb().addr("b"), flags)
}

fn u(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// A client of a unix stream server at a path: refused without a policy (nothing frozen, the error names
/// the socket and the flag), then moved with `connect`; on b it talks to b's server at the same path.
pub fn unix_connect_reaches_the_server_on_b() -> Result<(), Failed> {
    let tb = tb();
    let path = local("echo.sock");
    let (sa, sb, cl) = (format!("esa{}", unique()), format!("esb{}", unique()), format!("cl{}", unique()));
    let server_a = tb.start_workload("a", &["echo-server", "--path", &path, "--name", &sa]);
    let server_b = tb.start_workload("b", &["echo-server", "--path", &path, "--name", &sb]);
    let pid = tb.start_workload("a", &["client", "--connect", &path, "--name", &cl]);
    check(
        wait_until(Duration::from_secs(5), || tb.query("a", &cl).is_ok_and(|v| u(&v, "answers") >= 3)),
        "the client gets no answers on a",
    )?;

    let frozen_before = freezes(pid);
    let r = migrate(pid, &[]);
    let err = r.json["error"].as_str().unwrap_or_default();
    check(!r.success, format!("migrated without a policy: {}", r.json))?;
    check(
        err.contains("[external-unix]") && err.contains(&path) && err.contains(&format!("--unix path:{path}=connect")),
        format!("the refusal does not name the socket's peer and the flag: {err}"),
    )?;
    check(freezes(pid) == frozen_before, "refused, yet the client was frozen")?;
    check(tb.running("a", pid), "refused, yet the client does not run on a")?;

    let (ok, report) = {
        let out =
            tb.exec("a", &["migrate", "check", "--json", "--unix", &format!("path:{path}=connect"), &pid.to_string()]);
        (out.status.success(), serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default())
    };
    let planned = &report["external"]["unix"][0];
    check(
        ok && planned["action"]["connect"]["path"] == path.as_str(),
        format!("check does not show the plan: {report}"),
    )?;

    let r = migrate(pid, &["--unix", &format!("path:{path}=connect")]);
    check(r.success, format!("migrate with connect failed: {} {}", r.json, r.stderr))?;
    check(tb.running("b", pid) && !tb.running("a", pid), "the client is not (only) on b")?;
    let before = tb.query("b", &cl)?;
    let got = wait_until(Duration::from_secs(5), || {
        tb.query("b", &cl).is_ok_and(|v| v["last_host"] == "b" && u(&v, "answers") > u(&before, "answers"))
    });
    check(got, format!("the client gets no answers from b's server: {:?}", tb.query("b", &cl)))?;
    let srv = tb.query("b", &sb)?;
    check(u(&srv, "connections") == 1 && u(&srv, "lines") > 0, format!("b's server saw no messages: {srv}"))?;
    for (h, p) in [("b", pid), ("a", server_a), ("b", server_b)] {
        tb.kill(h, p);
    }
    Ok(())
}

/// A client that had bytes from its server unread at the freeze reads exactly those first on b, in front
/// of the greeting b's server sends when it accepts.
pub fn unread_bytes_are_read_first_after_the_move() -> Result<(), Failed> {
    let tb = tb();
    let path = local("push.sock");
    let go = local("go");
    let unread = format!("UNREAD-{} ", unique());
    let (sa, sb, cl) = (format!("psa{}", unique()), format!("psb{}", unique()), format!("cu{}", unique()));
    let server_a = tb.start_workload("a", &["echo-server", "--path", &path, "--name", &sa, "--push-unread", &unread]);
    let server_b =
        tb.start_workload("b", &["echo-server", "--path", &path, "--name", &sb, "--push-unread", "HELLO-B "]);
    let pid = tb.start_workload("a", &["client", "--connect", &path, "--name", &cl, "--read-when", &go]);
    check(
        wait_until(Duration::from_secs(5), || tb.query("a", &sa).is_ok_and(|v| u(&v, "connections") == 1)),
        "a's server did not accept the client",
    )?;
    let r = migrate(pid, &["--unix", &format!("path:{path}=connect")]);
    check(r.success, format!("migrate failed: {} {}", r.json, r.stderr))?;
    check(tb.exec("b", &["touch", &go]).status.success(), "cannot create the go file on b")?;
    let read = wait_until(Duration::from_secs(5), || tb.query("b", &cl).is_ok_and(|v| v["first_read"].is_string()));
    let v = tb.query("b", &cl)?;
    check(read, format!("the client read nothing on b: {v}"))?;
    let first = v["first_read"].as_str().unwrap_or_default();
    check(
        first.starts_with(&unread) && first[unread.len()..].starts_with("HELLO-B"),
        format!("first bytes read on b: {first:?}, expected {unread:?} then b's greeting"),
    )?;
    for (h, p) in [("b", pid), ("a", server_a), ("b", server_b)] {
        tb.kill(h, p);
    }
    Ok(())
}

/// A process logging through a datagram socket connected to a daemon's path keeps logging, to b's daemon.
pub fn datagram_logger_keeps_logging_on_b() -> Result<(), Failed> {
    let tb = tb();
    let path = local("log.sock");
    let (da, db, lg) = (format!("lda{}", unique()), format!("ldb{}", unique()), format!("lg{}", unique()));
    let daemon_a = tb.start_workload("a", &["log-daemon", "--path", &path, "--name", &da]);
    let daemon_b = tb.start_workload("b", &["log-daemon", "--path", &path, "--name", &db]);
    let pid = tb.start_workload("a", &["logger", "--dgram", &path, "--name", &lg]);
    check(
        wait_until(Duration::from_secs(5), || tb.query("a", &da).is_ok_and(|v| u(&v, "received") >= 3)),
        "a's daemon gets no log lines",
    )?;
    let r = migrate(pid, &["--unix", &format!("path:{path}=connect")]);
    check(r.success, format!("migrate failed: {} {}", r.json, r.stderr))?;
    let last_on_a = u(&tb.query("a", &da)?["max_seq"], &lg);
    let logged = wait_until(Duration::from_secs(5), || {
        tb.query("b", &db).is_ok_and(|v| v["max_seq"][&lg].as_u64().unwrap_or(0) > last_on_a + 5)
    });
    check(
        logged,
        format!("b's daemon does not get the logger's lines: {:?} (a had up to {last_on_a})", tb.query("b", &db)),
    )?;
    let l = tb.query("b", &lg)?;
    check(u(&l, "errors") == 0, format!("the logger saw send errors: {l}"))?;
    for (h, p) in [("b", pid), ("a", daemon_a), ("b", daemon_b)] {
        tb.kill(h, p);
    }
    Ok(())
}

/// A server holding an accepted connection from a client outside the tree moves with `broker`: on b the
/// reference broker (migrate-broker, rule `accept`) hands over a connection from a new client, and
/// messages flow both ways.
pub fn broker_hands_over_a_new_client() -> Result<(), Failed> {
    let tb = tb();
    let path = local("srv.sock");
    let accept = local("accept.sock");
    let broker = local("broker.sock");
    let config = tb.dir.join(format!("broker-{}.toml", unique()));
    std::fs::write(&config, format!("[[rule]]\nmatch = {{ peer_comm = \"workload\" }}\naccept = \"{accept}\"\n"))?;
    let broker_bin = tb.bin.join("migrate-broker");
    let cmd = format!(
        "exec {} --socket {broker} --config {} 2>>{}",
        broker_bin.display(),
        config.display(),
        tb.dir.join("b/broker.log").display()
    );
    check(tb.exec_detached("b", &["setsid", "-f", "sh", "-c", &cmd]), "cannot start migrate-broker on b")?;
    let (srv, old, new) = (format!("srv{}", unique()), format!("old{}", unique()), format!("new{}", unique()));
    let pid = tb.start_workload("a", &["echo-server", "--path", &path, "--name", &srv]);
    let old_client = tb.start_workload("a", &["client", "--connect", &path, "--name", &old]);
    // The new client connects to the broker's accept socket on b and waits there to be handed over.
    check(
        wait_until(Duration::from_secs(5), || tb.exec("b", &["test", "-S", &accept]).status.success()),
        "the broker does not listen on b",
    )?;
    let new_client = tb.start_workload("b", &["client", "--connect", &accept, "--name", &new]);
    check(
        wait_until(Duration::from_secs(5), || tb.query("a", &old).is_ok_and(|v| u(&v, "answers") >= 2)),
        "the old client gets no answers on a",
    )?;
    let r = migrate(pid, &["--unix", &format!("path:{path}=broker:{broker}")]);
    check(r.success, format!("migrate with broker failed: {} {}", r.json, r.stderr))?;
    check(tb.running("b", pid) && !tb.running("a", pid), "the server is not (only) on b")?;
    let talks = wait_until(Duration::from_secs(5), || tb.query("b", &new).is_ok_and(|v| u(&v, "answers") >= 3));
    check(talks, format!("the new client gets no answers from the moved server: {:?}", tb.query("b", &new)))?;
    let v = tb.query("b", &new)?;
    check(
        v["last_answer"].as_str().is_some_and(|a| a.contains(&format!("echo {new} seq"))),
        format!("the answers are not the server's echo of the new client: {v}"),
    )?;
    let s = tb.query("b", &srv)?;
    check(
        s["pid"] == pid && s["last_line"].as_str().is_some_and(|l| l.starts_with(&new)),
        format!("server on b: {s}"),
    )?;
    check(
        // EOF, or a reset when the killed server had not read the client's last line.
        wait_until(Duration::from_secs(5), || {
            tb.query("a", &old).is_ok_and(|v| v["eof"] == true || v["error"].is_string())
        }),
        format!("the old client on a did not see its server go: {:?}", tb.query("a", &old)),
    )?;
    for (h, p) in [("b", pid), ("a", old_client), ("b", new_client)] {
        tb.kill(h, p);
    }
    let _ = tb.exec("b", &["pkill", "-f", &broker]);
    let _ = std::fs::remove_file(&config);
    Ok(())
}

/// The last tick number tmux shows in its pane.
fn last_tick(host: &str, sock: &str) -> Option<u64> {
    let out = tb().exec(host, &["tmux", "-S", sock, "capture-pane", "-p", "-t", "mig"]);
    String::from_utf8_lossy(&out.stdout).lines().rev().find_map(|l| l.strip_prefix("tick ")?.trim().parse().ok())
}

/// A tmux server with a program in its pane and a client attached from a terminal moves with `hangup`
/// for the client's connection and terminal: on b the pane is the same and its program still runs, and a
/// new client attaches.
pub fn tmux_with_an_attached_client_moves() -> Result<(), Failed> {
    let tb = tb();
    let sock = local("tmux.sock");
    let program = "i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.2; done";
    check(
        tb.exec_detached("a", &["setsid", "-f", "tmux", "-S", &sock, "new-session", "-d", "-s", "mig", program]),
        "cannot start tmux on a",
    )?;
    // `setsid -f` returns before the server listens: a client started earlier finds no server and exits.
    let session = wait_until(Duration::from_secs(5), || {
        tb.exec("a", &["tmux", "-S", &sock, "has-session", "-t", "mig"]).status.success()
    });
    check(session, "the tmux session did not start on a")?;
    let (pc, pcb) = (format!("pc{}", unique()), format!("pcb{}", unique()));
    let client =
        tb.start_workload("a", &["pty-client", "--name", &pc, "--", "tmux", "-S", &sock, "attach", "-t", "mig"]);
    let out = tb.exec("a", &["tmux", "-S", &sock, "display", "-p", "#{pid}"]);
    let server: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().map_err(|_| "no tmux server pid")?;
    let attached = wait_until(Duration::from_secs(5), || {
        String::from_utf8_lossy(&tb.exec("a", &["tmux", "-S", &sock, "list-clients"]).stdout).contains("attached")
    });
    check(attached, "the client did not attach on a")?;

    // Without policies: both the connection and the terminal are named.
    let r = migrate(server, &[]);
    let err = r.json["error"].as_str().unwrap_or_default();
    check(
        !r.success
            && err.contains("[external-unix]")
            && err.contains("[external-tty]")
            && err.contains("--tty path:/dev/pts/"),
        format!("refusal: {}", r.json),
    )?;

    let before = last_tick("a", &sock).unwrap_or(0);
    let r = migrate(server, &["--unix", "comm:tmux: client=hangup", "--tty", "comm:tmux: client=hangup"]);
    check(r.success, format!("migrate of the tmux server failed: {} {}", r.json, r.stderr))?;
    check(tb.running("b", server) && !tb.running("a", server), "the tmux server is not (only) on b")?;
    let t1 = last_tick("b", &sock);
    check(
        t1.is_some_and(|t| t >= before),
        format!("the pane on b does not show the program's ticks ({t1:?}, a had {before})"),
    )?;
    let going = wait_until(Duration::from_secs(5), || last_tick("b", &sock) > t1);
    check(going, "the program in the pane does not run on b")?;
    check(
        wait_until(Duration::from_secs(5), || tb.query("a", &pc).is_ok_and(|v| v["child_alive"] == false)),
        "the old client on a is still attached",
    )?;
    let client_b =
        tb.start_workload("b", &["pty-client", "--name", &pcb, "--", "tmux", "-S", &sock, "attach", "-t", "mig"]);
    let shows = wait_until(Duration::from_secs(5), || {
        tb.query("b", &pcb)
            .is_ok_and(|v| v["child_alive"] == true && v["tail"].as_str().is_some_and(|t| t.contains("tick")))
    });
    check(shows, format!("a new client on b does not show the pane: {:?}", tb.query("b", &pcb)))?;
    let _ = tb.exec("b", &["tmux", "-S", &sock, "kill-server"]);
    for (h, p) in [("a", client), ("b", client_b), ("b", server)] {
        tb.kill(h, p);
    }
    Ok(())
}

//! A generated C++ Bazel workspace, and Bazel 4.2.3 run offline against it.
//!
//! Debian's `bazel-bootstrap` runs offline only when `rules_cc`, `rules_java` and
//! `remote_coverage_tools` are overridden with local repositories; the tiny ones written here
//! re-export the native rules. `platforms` comes from Debian's `bazel-platforms`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const PLATFORMS: &str = "/usr/share/bazel/tools/platforms";

/// A generated workspace with `libs` cc_library targets, each with a cc_test.
pub struct Workspace {
    pub root: PathBuf,
    pub repos: PathBuf,
    pub libs: usize,
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

impl Workspace {
    /// Writes the workspace and the override repositories under `dir`.
    pub fn generate(dir: &Path, libs: usize) -> Workspace {
        let repos = dir.join("repos");
        write(
            &repos.join("rules_cc/WORKSPACE"),
            "workspace(name = \"rules_cc\")\n",
        );
        write(&repos.join("rules_cc/BUILD"), "");
        write(&repos.join("rules_cc/cc/BUILD"), "");
        write(
            &repos.join("rules_cc/cc/defs.bzl"),
            "cc_library = native.cc_library\ncc_binary = native.cc_binary\ncc_test = native.cc_test\n\
             cc_import = native.cc_import\ncc_proto_library = native.cc_proto_library\n\
             cc_toolchain = native.cc_toolchain\ncc_toolchain_suite = native.cc_toolchain_suite\n\
             objc_library = native.objc_library\n",
        );
        write(
            &repos.join("rules_java/WORKSPACE"),
            "workspace(name = \"rules_java\")\n",
        );
        write(&repos.join("rules_java/BUILD"), "");
        write(&repos.join("rules_java/java/BUILD"), "");
        write(
            &repos.join("rules_java/java/defs.bzl"),
            "java_library = native.java_library\njava_binary = native.java_binary\njava_test = native.java_test\n\
             java_import = native.java_import\njava_proto_library = native.java_proto_library\n\
             java_toolchain = native.java_toolchain\njava_runtime = native.java_runtime\n",
        );
        write(
            &repos.join("remote_coverage_tools/WORKSPACE"),
            "workspace(name = \"remote_coverage_tools\")\n",
        );
        write(
            &repos.join("remote_coverage_tools/BUILD"),
            "package(default_visibility = [\"//visibility:public\"])\n\
             filegroup(name = \"coverage_report_generator\", srcs = [])\n\
             filegroup(name = \"lcov_merger\", srcs = [])\n",
        );

        let root = dir.join("ws");
        write(&root.join("WORKSPACE"), "workspace(name = \"gen\")\n");
        for i in 0..libs {
            let deps: Vec<usize> = [i.checked_sub(1), (i >= 2).then_some(i / 2)]
                .into_iter()
                .flatten()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let dep_labels: Vec<String> = deps
                .iter()
                .map(|d| format!("\"//lib{d}:lib{d}\""))
                .collect();
            write(
                &root.join(format!("lib{i}/BUILD")),
                &format!(
                    "cc_library(\n    name = \"lib{i}\",\n    srcs = [\"lib{i}.cc\"],\n    hdrs = [\"lib{i}.h\"],\n    deps = [{deps}],\n    visibility = [\"//visibility:public\"],\n)\n\n\
                     cc_test(\n    name = \"lib{i}_test\",\n    srcs = [\"lib{i}_test.cc\"],\n    deps = [\":lib{i}\"],\n)\n",
                    deps = dep_labels.join(", ")
                ),
            );
            write(
                &root.join(format!("lib{i}/lib{i}.h")),
                &format!(
                    "#pragma once\n#include <cstdint>\nnamespace gen {{\nstd::uint64_t f{i}(std::uint64_t x);\n}}\n"
                ),
            );
            let includes: String = deps
                .iter()
                .map(|d| format!("#include \"lib{d}/lib{d}.h\"\n"))
                .collect();
            let calls: String = deps
                .iter()
                .map(|d| format!("  acc ^= f{d}(x + {i});\n"))
                .collect();
            write(
                &root.join(format!("lib{i}/lib{i}.cc")),
                &format!(
                    "#include \"lib{i}/lib{i}.h\"\n{includes}#include <map>\n#include <string>\n#include <vector>\n\
                     namespace gen {{\n\
                     std::uint64_t f{i}(std::uint64_t x) {{\n  std::uint64_t acc = x * {m}u + {i}u;\n{calls}\
                     \x20 std::map<std::string, std::vector<int>> m;\n  m[std::to_string(acc % 97)].push_back({i});\n\
                     \x20 return acc + m.size();\n}}\n}}\n",
                    m = 2 * i + 3
                ),
            );
            write(
                &root.join(format!("lib{i}/lib{i}_test.cc")),
                &format!(
                    "#include \"lib{i}/lib{i}.h\"\n#include <cstdio>\n\
                     int main() {{\n  auto a = gen::f{i}(1);\n  auto b = gen::f{i}(1);\n  std::printf(\"f{i}(1) = %llu\\n\", (unsigned long long)a);\n  return a == b ? 0 : 1;\n}}\n"
                ),
            );
        }
        Workspace { root, repos, libs }
    }

    /// The output files worth comparing between builds: every test binary and library archive.
    pub fn artifacts(&self) -> Vec<String> {
        (0..self.libs)
            .flat_map(|i| [format!("lib{i}/lib{i}_test"), format!("lib{i}/liblib{i}.a")])
            .collect()
    }
}

/// One Bazel installation state (its own output user root), driving a workspace.
pub struct Bazel {
    pub workspace: PathBuf,
    pub output_user_root: PathBuf,
    repos: PathBuf,
    /// `--batch` (a fresh JVM for every command) rather than a long-running Bazel server.
    batch: bool,
    /// Startup options before the command (`--host_jvm_args=...`).
    startup: Vec<String>,
}

/// Bazel's install base on Debian (`/etc/bazel/bazelrc`): its server's `java.library.path`.
const INSTALL_BASE: &str = "/usr/share/bazel";
/// Debian's netty-tcnative JNI library (`libnetty-tcnative-jni`).
const TCNATIVE: &str = "/usr/lib/x86_64-linux-gnu/jni/libnetty-tcnative.so";

/// A finished Bazel command.
pub struct Run {
    pub output: Output,
    pub elapsed: Duration,
}

impl Run {
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    /// `(processes, remote cache hits, internal)` from Bazel's summary line.
    pub fn process_summary(&self) -> (u64, u64, u64) {
        let err = self.stderr();
        let line = err
            .lines()
            .rev()
            .find(|l| l.contains(" processes:") || l.contains(" process:"))
            .unwrap_or_else(|| panic!("no process summary in:\n{err}"));
        let num = |label: &str| -> u64 {
            line.split([':', ',', '.'])
                .map(str::trim)
                .find(|part| part.ends_with(label))
                .and_then(|part| part.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        let total = line
            .split_whitespace()
            .find_map(|w| w.parse().ok())
            .unwrap_or(0);
        (total, num("remote cache hit"), num("internal"))
    }
}

impl Bazel {
    pub fn new(ws: &Workspace, output_user_root: &Path) -> Bazel {
        Bazel {
            workspace: ws.root.clone(),
            output_user_root: output_user_root.to_path_buf(),
            repos: ws.repos.clone(),
            batch: true,
            startup: Vec::new(),
        }
    }

    /// This Bazel speaking TLS (`grpcs://`). Debian's Bazel 4.2.3 has no TLS engine that can
    /// negotiate HTTP/2 by itself: its netty's JDK provider lacks ALPN ("JDK provider does not
    /// support ALPN protocol"). Upstream Bazel bundles netty-tcnative (OpenSSL); here Debian's
    /// `libnetty-tcnative-jni` is loaded instead, under the file name netty looks for, from a
    /// folder beside the output root added to the server's library path.
    pub fn with_openssl(mut self) -> Bazel {
        let jni = self.output_user_root.with_extension("jni");
        std::fs::create_dir_all(&jni).unwrap();
        let lib = jni.join("libnetty_tcnative.so");
        if !lib.exists() {
            std::fs::copy(TCNATIVE, lib)
                .expect("Debian's libnetty-tcnative-jni (scripts/setup --test installs it)");
        }
        self.startup.push(format!(
            "--host_jvm_args=-Djava.library.path={INSTALL_BASE}:{}",
            jni.display()
        ));
        self
    }

    /// Like [`Bazel::new`], but commands go to a Bazel server that stays up between them, as
    /// developers run Bazel (stop it with `shutdown`).
    pub fn with_server(ws: &Workspace, output_user_root: &Path) -> Bazel {
        Bazel {
            batch: false,
            ..Bazel::new(ws, output_user_root)
        }
    }

    /// Whether every command runs a fresh JVM (`--batch`).
    pub fn batch(&self) -> bool {
        self.batch
    }

    /// Runs `bazel [--batch] <command> <args>` with the offline overrides; panics on failure.
    pub fn run(&self, command: &str, args: &[String]) -> Run {
        self.run_expecting(command, args, 0)
    }

    /// [`Bazel::run`] of a command that must exit with `code` (3: tests failed).
    pub fn run_expecting(&self, command: &str, args: &[String], code: i32) -> Run {
        let mut cmd = Command::new("bazel");
        cmd.current_dir(&self.workspace)
            .arg(format!(
                "--output_user_root={}",
                self.output_user_root.display()
            ))
            .args(self.batch.then_some("--batch"))
            .args(&self.startup)
            .arg(command);
        if !["clean", "shutdown", "info"].contains(&command) {
            for repo in ["rules_cc", "rules_java", "remote_coverage_tools"] {
                cmd.arg(format!(
                    "--override_repository={repo}={}",
                    self.repos.join(repo).display()
                ));
            }
            cmd.arg(format!("--override_repository=platforms={PLATFORMS}"));
            cmd.args([
                "--spawn_strategy=local",
                "--noshow_progress",
                "--color=no",
                "--curses=no",
            ]);
        }
        cmd.args(args);
        let start = Instant::now();
        let output = cmd
            .output()
            .expect("run bazel (apt-get install bazel-bootstrap bazel-platforms)");
        let run = Run {
            output,
            elapsed: start.elapsed(),
        };
        assert_eq!(
            run.output.status.code(),
            Some(code),
            "bazel {command} {args:?}:\n{}",
            run.stderr()
        );
        run
    }

    pub fn bazel_bin(&self) -> PathBuf {
        self.workspace.join("bazel-bin")
    }
}

/// Builds `ws` locally in its own output root and returns `(artifact, sha256)` of every
/// artifact: the reference remote builds must match byte for byte.
pub fn local_reference(ws: &Workspace, output_user_root: &Path) -> Vec<(String, String)> {
    let local = Bazel::new(ws, output_user_root);
    local.run("build", &["//...".into()]);
    let reference = ws
        .artifacts()
        .into_iter()
        .map(|a| {
            let h = super::sha256_file(&local.bazel_bin().join(&a));
            (a, h)
        })
        .collect();
    local.run("clean", &["--expunge".into()]);
    reference
}

//! The real Bazel 4.2.3 against `motorpool up` as its remote cache.

mod support;

use support::workspace::{Bazel, Workspace, local_reference};
use support::{Stack, sha256_file};

#[test]
fn bazel_rebuild_after_clean_is_all_remote_cache_hits_and_byte_identical() {
    support::require_bazel();
    let dir = tempfile::tempdir().unwrap();
    let ws = Workspace::generate(dir.path(), 50);

    // Reference: a purely local build in its own output root.
    let reference = local_reference(&ws, &dir.path().join("root-local"));

    let stack = Stack::up(&[]);
    let remote = Bazel::new(&ws, &dir.path().join("root-remote"));
    let flags = vec![
        "//...".to_string(),
        format!("--remote_cache=grpc://{}", stack.grpc),
        "--remote_instance_name=ci".to_string(),
        stack.bazel_auth(&stack.keys.ci),
    ];
    let cold = remote.run("build", &flags);
    let (total, hits, internal) = cold.process_summary();
    assert_eq!(hits, 0, "a cold cache has no hits: {}", cold.stderr());
    assert!(
        total - internal >= 200,
        "the workspace has at least 200 cacheable actions, got {total} - {internal}"
    );

    remote.run("clean", &["--expunge".into()]);
    let warm = remote.run("build", &flags);
    let (total, hits, internal) = warm.process_summary();
    assert_eq!(
        hits,
        total - internal,
        "every action must be a remote cache hit after clean --expunge:\n{}",
        warm.stderr()
    );
    for (artifact, expected) in &reference {
        assert_eq!(
            &sha256_file(&remote.bazel_bin().join(artifact)),
            expected,
            "{artifact} differs from the local build"
        );
    }

    // Another instance name is an isolated cache: nothing hits there.
    remote.run("clean", &["--expunge".into()]);
    let mut other = flags.clone();
    other[2] = "--remote_instance_name=grey".into();
    let isolated = remote.run("build", &other);
    assert_eq!(
        isolated.process_summary().1,
        0,
        "instance names must isolate caches"
    );
    remote.run("clean", &["--expunge".into()]);
}

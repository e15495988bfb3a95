//! deploy/docker against the code: both Dockerfiles pass hadolint and have the
//! documented shape (stages, dependency layer, non-root user, entrypoint,
//! config, the models baked in by `with-models`, every file that src/ compiles
//! in copied); .dockerignore keeps local state out of the build context and
//! lets every copied file in; the binary links nothing the slim runtime image
//! lacks.
//!
//! Tools: hadolint (scripts/setup-python.sh), ldd; helpers in
//! tests/deploy/support/.

use crate::common;
use crate::support;

use std::{collections::BTreeSet, path::Path, process::Command};

use common::*;
use serde_json::Value;
use support::{
    dockerfile::{uid_of, Dockerfile},
    dockerignore::{self, docker_ignored},
    *,
};
use tlserve::config::Config;

#[test]
fn dockerignore_keeps_local_state_out_of_the_build_context() {
    let ignore = dockerignore::patterns();
    for local_state in ["target", "models", ".venv", "heads", ".git"] {
        assert!(
            docker_ignored(&ignore, local_state),
            ".dockerignore keeps {local_state} out of the build context"
        );
    }
}

#[test]
fn the_binary_links_only_what_the_slim_runtime_image_has() {
    // The runtime image adds only ca-certificates to debian:bookworm-slim, so the
    // binary (built here on the builder's Debian release) may link only what
    // every Debian system has: no libssl, no libstdc++.
    let ldd = run_ok(
        Command::new(system_tool("ldd", "Debian's libc-bin")).arg(env!("CARGO_BIN_EXE_tlserve")),
        None,
    );
    for line in ldd.lines().filter(|l| !l.trim().is_empty()) {
        let library = line.split_whitespace().next().unwrap_or_default();
        let base = [
            "linux-vdso.so.1",
            "libgcc_s.so.1",
            "libm.so.6",
            "libc.so.6",
            "libpthread.so.0",
            "libdl.so.2",
            "librt.so.1",
        ];
        assert!(
            base.contains(&library) || library.starts_with("/lib64/ld-linux"),
            "tlserve links {library}, which debian:bookworm-slim lacks: install it in the runtime stage\n{ldd}"
        );
    }
}

#[test]
fn dockerfiles_pass_hadolint_and_build_the_documented_images() {
    let hadolint = venv_tool("hadolint");
    let ignore = dockerignore::patterns();
    for (path, cuda) in [
        ("deploy/docker/Dockerfile", false),
        ("deploy/docker/Dockerfile.cuda", true),
    ] {
        let lint = run(
            Command::new(&hadolint)
                .arg("--no-color")
                .arg(repo_file(path)),
            None,
        );
        assert!(
            lint.status.success() && lint.stdout.is_empty(),
            "hadolint {path}:\n{}{}",
            String::from_utf8_lossy(&lint.stdout),
            String::from_utf8_lossy(&lint.stderr)
        );

        let dockerfile = Dockerfile::parse(path);
        let names: Vec<&str> = dockerfile.stages.iter().map(|s| s.name.as_str()).collect();
        for stage in [
            "builder",
            "models",
            "runtime-base",
            "with-models",
            "runtime",
        ] {
            assert!(names.contains(&stage), "{path}: stage {stage} in {names:?}");
        }
        assert_eq!(
            names.last(),
            Some(&"runtime"),
            "{path}: the default target is the last stage"
        );

        // Builder: the official Rust image (CPU) or CUDA's devel image, with the
        // dependencies built in a layer of their own before the source arrives.
        let builder = dockerfile.stage("builder");
        if cuda {
            assert!(
                builder.base.starts_with("nvidia/cuda:") && builder.base.contains("-devel-"),
                "{}",
                builder.base
            );
        } else {
            assert!(
                builder.base.starts_with("rust:1.") && builder.base.ends_with("-bookworm"),
                "{}",
                builder.base
            );
        }
        let position = |pred: &dyn Fn(&(String, String)) -> bool, what: &str| {
            builder
                .instructions
                .iter()
                .position(pred)
                .unwrap_or_else(|| panic!("{path}: builder has no {what}"))
        };
        let first_build = position(
            &|(k, a)| k == "RUN" && a.contains("cargo build"),
            "cargo build",
        );
        let source = position(&|(k, a)| k == "COPY" && a.starts_with("src "), "COPY src");
        assert!(
            first_build < source,
            "{path}: dependencies are built before the source is copied"
        );
        // Files the source compiles in (include_str!/include_bytes!) must be in
        // the build context's copy too, or the image build fails.
        let copied: Vec<&str> = builder
            .instructions
            .iter()
            .filter(|(k, _)| k == "COPY")
            .flat_map(|(_, a)| a.split_whitespace())
            .collect();
        for top in included_top_dirs() {
            assert!(
                copied.contains(&top.as_str()),
                "{path}: the builder does not copy {top}/, which src/ compiles in"
            );
        }
        let copied_before: String = builder.instructions[..first_build]
            .iter()
            .filter(|(k, _)| k == "COPY")
            .map(|(_, a)| a.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        for needed in ["Cargo.toml", "Cargo.lock", "build.rs", "proto"] {
            assert!(
                copied_before.split_whitespace().any(|w| w == needed),
                "{path}: {needed} is copied before the dependency build (build.rs compiles proto/)"
            );
        }
        for (_, args) in builder
            .instructions
            .iter()
            .filter(|(k, a)| k == "RUN" && a.contains("cargo build"))
        {
            assert!(
                args.contains("cargo build --release --locked"),
                "{path}: {args}"
            );
            assert_eq!(args.contains("--features cuda"), cuda, "{path}: {args}");
        }

        // Runtime: slim base, nothing but ca-certificates, the binary, a fixed
        // non-root uid, the documented ports, entrypoint and config.
        let base = dockerfile.stage("runtime-base");
        if cuda {
            assert!(
                base.base.starts_with("nvidia/cuda:") && base.base.contains("-runtime-"),
                "{}",
                base.base
            );
        } else {
            assert_eq!(base.base, "debian:bookworm-slim");
        }
        for (_, args) in base
            .instructions
            .iter()
            .filter(|(k, a)| k == "RUN" && a.contains("apt-get install"))
        {
            let packages: Vec<&str> = args
                .split("apt-get install")
                .nth(1)
                .unwrap()
                .split("&&")
                .next()
                .unwrap()
                .split_whitespace()
                .filter(|w| !w.starts_with('-'))
                .collect();
            assert_eq!(packages, ["ca-certificates"], "{path}: runtime packages");
        }
        assert!(
            base.instructions.iter().any(|(k, a)| k == "COPY"
                && a.starts_with("--from=builder ")
                && a.ends_with(" /usr/local/bin/tlserve")),
            "{path}: the binary at /usr/local/bin/tlserve"
        );
        for target in ["runtime", "with-models"] {
            let user = dockerfile
                .effective(target, "USER")
                .unwrap_or_else(|| panic!("{path}: {target} has no USER"));
            assert_ne!(uid_of(&user), 0, "{path}: {target} runs as non-root");
            assert_eq!(
                uid_of(&user),
                10001,
                "{path}: the uid the Kubernetes manifests use"
            );
            let exposed: BTreeSet<String> = dockerfile
                .effective(target, "EXPOSE")
                .expect("EXPOSE")
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            assert_eq!(
                exposed,
                BTreeSet::from(["50051".to_owned(), "9090".to_owned(), "8080".to_owned()]),
                "{path}"
            );
            let entrypoint: Value = serde_json::from_str(
                &dockerfile
                    .effective(target, "ENTRYPOINT")
                    .expect("ENTRYPOINT"),
            )
            .expect("exec-form ENTRYPOINT");
            assert_eq!(entrypoint, serde_json::json!(["tlserve"]), "{path}");
            let cmd: Value =
                serde_json::from_str(&dockerfile.effective(target, "CMD").expect("CMD"))
                    .expect("exec-form CMD");
            assert_eq!(
                cmd,
                serde_json::json!(["serve", "--config", "/etc/tlserve/tlserve.toml"]),
                "{path}"
            );
        }
        let config_copy = base
            .instructions
            .iter()
            .find(|(k, a)| k == "COPY" && a.ends_with(" /etc/tlserve/tlserve.toml"))
            .unwrap_or_else(|| panic!("{path}: the config at /etc/tlserve/tlserve.toml"));
        let config_source = config_copy.1.split_whitespace().next().unwrap();
        // The image's config with the image's own TLSERVE__* environment, as the
        // server will read it.
        let env: Vec<(String, String)> = dockerfile
            .env("runtime")
            .into_iter()
            .filter(|(k, _)| k.starts_with("TLSERVE__"))
            .collect();
        let config = Config::from_toml(&read(config_source), Path::new("/etc/tlserve"), env)
            .unwrap_or_else(|err| panic!("{path}: the server rejects the image's config: {err}"));
        assert_eq!(config.server.listen.port(), 50051);
        assert_eq!(config.server.metrics_listen.map(|a| a.port()), Some(9090));
        assert_eq!(config.server.http_listen.map(|a| a.port()), Some(8080));
        assert!(
            config.server.listen.ip().is_unspecified(),
            "reachable from outside the container"
        );
        assert_eq!(
            config.backbones[0].device,
            if cuda { "cuda:0" } else { "cpu" }
        );
        assert_eq!(
            config.backbones[0].source.path.as_deref(),
            Some(Path::new("/models/all-MiniLM-L6-v2"))
        );
        assert_eq!(config.heads.store_dir, Path::new("/heads"));

        // with-models: the weights, fetched by scripts/fetch-models.sh, at /models.
        let models = dockerfile.stage("models");
        assert!(models.base.starts_with("python:3."), "{}", models.base);
        assert!(models
            .instructions
            .iter()
            .any(|(k, a)| k == "COPY" && a.starts_with("scripts/fetch-models.sh ")));
        assert!(models
            .instructions
            .iter()
            .any(|(k, a)| k == "RUN" && a.ends_with("fetch-models.sh /models")));
        // It fetches exactly the models the image's config serves.
        let fetched = dockerfile
            .env("models")
            .into_iter()
            .find(|(k, _)| k == "TLSERVE_MODELS")
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("{path}: the models stage sets TLSERVE_MODELS"));
        assert_eq!(
            fetched_models(&fetched),
            served_models(&config, Path::new("/models")),
            "{path}: TLSERVE_MODELS"
        );
        let with_models = dockerfile.stage("with-models");
        assert_eq!(with_models.base, "runtime-base");
        assert!(with_models.instructions.iter().any(|(k, a)| k == "COPY"
            && a.starts_with("--from=models ")
            && a.ends_with(" /models /models")));
        assert_eq!(dockerfile.stage("runtime").base, "runtime-base");

        // Every file copied from the build context exists and is not ignored.
        for stage in &dockerfile.stages {
            for (_, args) in stage
                .instructions
                .iter()
                .filter(|(k, _)| k == "COPY" || k == "ADD")
            {
                let words: Vec<&str> = args.split_whitespace().collect();
                if words.iter().any(|w| w.starts_with("--from=")) {
                    continue;
                }
                let sources: Vec<&str> = words
                    .iter()
                    .filter(|w| !w.starts_with("--"))
                    .copied()
                    .collect();
                for source in &sources[..sources.len() - 1] {
                    repo_file(source);
                    assert!(
                        !docker_ignored(&ignore, source),
                        "{path}: {source} is in .dockerignore"
                    );
                }
            }
        }
    }
}

/// Top-level folders of the files that src/ compiles in with include_str! or
/// include_bytes! (paths relative to the including file).
fn included_top_dirs() -> std::collections::BTreeSet<String> {
    fn visit(dir: &std::path::Path, out: &mut std::collections::BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                visit(&path, out);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for macro_name in ["include_str!(\"", "include_bytes!(\""] {
                for piece in text.split(macro_name).skip(1) {
                    let relative = piece.split('"').next().expect("a path");
                    let target = path.parent().expect("parent").join(relative);
                    let target = target
                        .canonicalize()
                        .unwrap_or_else(|err| panic!("{}: {relative}: {err}", path.display()));
                    let root = repo_file("").canonicalize().expect("repo root");
                    let inside = target.strip_prefix(&root).expect("inside the repository");
                    let top = inside.components().next().expect("a top folder");
                    out.insert(top.as_os_str().to_string_lossy().into_owned());
                }
            }
        }
    }
    let mut out = std::collections::BTreeSet::new();
    visit(&repo_file("src"), &mut out);
    out
}

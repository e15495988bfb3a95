//! The Dockerfiles under deploy/docker, parsed by the `parse-dockerfile` crate
//! and reduced to what the checks look at: named stages, the stage each is
//! built FROM (global ARGs substituted), and their instructions as
//! (INSTRUCTION, arguments) text.

use std::collections::BTreeMap;

use parse_dockerfile::{Command, Flag, Instruction, Source, UnescapedString};

use super::read;

pub struct Stage {
    pub base: String,
    pub name: String,
    /// (INSTRUCTION, arguments), continuation lines joined, comments dropped.
    pub instructions: Vec<(String, String)>,
}

pub struct Dockerfile {
    pub path: String,
    pub stages: Vec<Stage>,
}

impl Dockerfile {
    pub fn parse(relative: &str) -> Self {
        let source = read(relative);
        // Docker (and the parser) accept a dangling `\` at the end; we do not.
        let last_line = source
            .lines()
            .map(str::trim)
            .rfind(|line| !line.starts_with('#'));
        assert!(
            !last_line.is_some_and(|line| line.ends_with('\\')),
            "{relative} ends in a continuation"
        );
        let parsed = parse_dockerfile::parse(&source)
            .unwrap_or_else(|err| panic!("{relative} is not a valid Dockerfile: {err}"));

        let global_args: BTreeMap<String, String> = parsed
            .global_args()
            .map(|arg| {
                let args = &arg.arguments.value;
                let (name, default) = args.split_once('=').unwrap_or((args, ""));
                (name.to_owned(), default.to_owned())
            })
            .collect();
        let stages = parsed
            .stages()
            .map(|stage| {
                let mut from = stage.from.image.value.to_string();
                for (name, value) in &global_args {
                    from = from.replace(&format!("${{{name}}}"), value);
                }
                let name = stage.from.as_.as_ref().map(|(_, name)| &name.value);
                assert!(
                    stage.from.options.is_empty() && name.is_some(),
                    "{relative}: every stage is named (FROM image AS name): {from}"
                );
                assert!(!from.contains('$'), "{relative}: unresolved ARG in {from}");
                Stage {
                    base: from,
                    name: name.unwrap().to_string(),
                    instructions: stage.instructions.iter().map(instruction).collect(),
                }
            })
            .collect();
        Self {
            path: relative.to_owned(),
            stages,
        }
    }

    pub fn stage(&self, name: &str) -> &Stage {
        self.stages
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{}: no stage {name}", self.path))
    }

    /// The stage and its ancestors within this file, nearest first.
    pub fn chain(&self, name: &str) -> Vec<&Stage> {
        let mut chain = vec![self.stage(name)];
        while let Some(parent) = self
            .stages
            .iter()
            .find(|s| s.name == chain.last().unwrap().base)
        {
            chain.push(parent);
        }
        chain
    }

    /// The last value of `keyword` that applies to stage `name` (inherited from
    /// the stages it is built FROM).
    pub fn effective(&self, name: &str, keyword: &str) -> Option<String> {
        self.chain(name).into_iter().find_map(|stage| {
            stage
                .instructions
                .iter()
                .rev()
                .find(|(k, _)| k == keyword)
                .map(|(_, args)| args.clone())
        })
    }

    /// The ENV settings that apply to stage `name`, as (name, value).
    pub fn env(&self, name: &str) -> Vec<(String, String)> {
        let mut env = Vec::new();
        for stage in self.chain(name).into_iter().rev() {
            for (_, args) in stage.instructions.iter().filter(|(k, _)| k == "ENV") {
                for pair in args.split_whitespace() {
                    let (key, value) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("{}: ENV uses KEY=value: {args}", self.path));
                    env.push((key.to_owned(), value.to_owned()));
                }
            }
        }
        env
    }
}

/// An instruction as (INSTRUCTION, arguments): flags as `--name=value`, then
/// the arguments separated by single spaces; exec-form (JSON array) commands
/// as JSON, shell-form ones with their line continuations joined.
fn instruction(instruction: &Instruction<'_>) -> (String, String) {
    fn words<'a>(items: impl IntoIterator<Item = &'a UnescapedString<'a>>) -> Vec<String> {
        items.into_iter().map(|s| s.value.to_string()).collect()
    }
    fn flags(options: &[Flag<'_>]) -> Vec<String> {
        options
            .iter()
            .map(|flag| match &flag.value {
                Some(value) => format!("--{}={}", flag.name.value, value.value),
                None => format!("--{}", flag.name.value),
            })
            .collect()
    }
    fn sources(sources: &[Source<'_>]) -> Vec<String> {
        sources
            .iter()
            .map(|source| match source {
                Source::Path(path) => path.value.to_string(),
                Source::HereDoc(doc) => doc.value.to_string(),
                _ => String::new(),
            })
            .collect()
    }
    fn command(command: &Command<'_>) -> String {
        match command {
            Command::Exec(array) => {
                serde_json::to_string(&words(array.value.iter())).expect("a JSON array")
            }
            // Docker's shell form keeps the text; a line continuation joins
            // lines, and comment lines between continued lines are dropped.
            Command::Shell(shell) => shell
                .value
                .lines()
                .map(str::trim)
                .filter(|line| !line.starts_with('#'))
                .map(|line| line.strip_suffix('\\').unwrap_or(line).trim())
                .filter(|line| !line.is_empty())
                .collect::<Vec<_>>()
                .join(" "),
            _ => String::new(),
        }
    }
    let (keyword, parts): (&str, Vec<String>) = match instruction {
        Instruction::Add(add) => (
            "ADD",
            [
                flags(&add.options),
                sources(&add.src),
                vec![add.dest.value.to_string()],
            ]
            .concat(),
        ),
        Instruction::Copy(copy) => (
            "COPY",
            [
                flags(&copy.options),
                sources(&copy.src),
                vec![copy.dest.value.to_string()],
            ]
            .concat(),
        ),
        Instruction::Run(run) => (
            "RUN",
            [flags(&run.options), vec![command(&run.arguments)]].concat(),
        ),
        Instruction::Cmd(cmd) => ("CMD", vec![command(&cmd.arguments)]),
        Instruction::Entrypoint(entrypoint) => ("ENTRYPOINT", vec![command(&entrypoint.arguments)]),
        Instruction::Arg(arg) => ("ARG", vec![arg.arguments.value.to_string()]),
        Instruction::Env(env) => ("ENV", vec![env.arguments.value.to_string()]),
        Instruction::Expose(expose) => ("EXPOSE", words(expose.arguments.iter())),
        Instruction::Label(label) => ("LABEL", vec![label.arguments.value.to_string()]),
        Instruction::User(user) => ("USER", vec![user.arguments.value.to_string()]),
        Instruction::Workdir(workdir) => ("WORKDIR", vec![workdir.arguments.value.to_string()]),
        Instruction::Stopsignal(signal) => ("STOPSIGNAL", vec![signal.arguments.value.to_string()]),
        Instruction::Shell(shell) => (
            "SHELL",
            vec![serde_json::to_string(&words(shell.arguments.iter())).expect("a JSON array")],
        ),
        // No check looks at these instructions' arguments.
        Instruction::Healthcheck(_) => ("HEALTHCHECK", Vec::new()),
        Instruction::Maintainer(_) => ("MAINTAINER", Vec::new()),
        Instruction::Onbuild(_) => ("ONBUILD", Vec::new()),
        Instruction::Volume(_) => ("VOLUME", Vec::new()),
        Instruction::From(_) => ("FROM", Vec::new()),
        _ => ("", Vec::new()),
    };
    (keyword.to_owned(), parts.join(" "))
}

/// The uid of a USER instruction's value (`10001` or `10001:10001`).
pub fn uid_of(user: &str) -> u32 {
    user.split(':').next().unwrap().parse().unwrap_or_else(|_| {
        panic!("USER is a numeric uid, so Kubernetes can verify runAsNonRoot: {user}")
    })
}

/// The uid the CPU image runs as.
pub fn image_uid() -> u32 {
    let dockerfile = Dockerfile::parse("deploy/docker/Dockerfile");
    uid_of(&dockerfile.effective("runtime", "USER").expect("USER"))
}

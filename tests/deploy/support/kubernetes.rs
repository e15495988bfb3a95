//! The Kubernetes manifests as the cluster would get them: a kustomize overlay
//! rendered by `kubectl kustomize`, with access to the objects, the pod and
//! the server config it runs with.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;
use tlserve::config::Config;

use super::{find_named, kubectl, labels_of, list, run_ok, text, yaml_documents};
use crate::common::repo_file;

/// The kustomize overlays under deploy/k8s/overlays.
pub const OVERLAYS: [&str; 3] = ["cpu", "gpu", "object-storage"];

/// Kubernetes versions the manifests must be valid for: 1.27 made native gRPC
/// probes GA; 1.37 is the newest schema kubernetes-validate ships.
pub const KUBERNETES_VERSIONS: [&str; 2] = ["1.27.0", "1.37.0"];

/// API groups of custom resources: kubernetes-validate has no schema for them.
pub const CUSTOM_RESOURCE_GROUPS: [&str; 1] = ["monitoring.coreos.com/"];

pub struct Rendered {
    pub overlay: &'static str,
    pub objects: Vec<Value>,
}

impl Rendered {
    /// `kubectl kustomize deploy/k8s/overlays/<overlay>`, parsed.
    pub fn render(overlay: &'static str) -> Self {
        let dir = repo_file(&format!("deploy/k8s/overlays/{overlay}"));
        let yaml = run_ok(Command::new(kubectl()).arg("kustomize").arg(&dir), None);
        let objects = yaml_documents(&yaml);
        assert!(!objects.is_empty(), "{overlay}: rendered nothing");
        Self { overlay, objects }
    }

    pub fn all(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    pub fn named(&self, kind: &str, name: &str) -> &Value {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{}: no {kind} named {name}", self.overlay))
    }

    /// A ConfigMap from a kustomize configMapGenerator: its name carries a hash.
    pub fn generated_config_map(&self, generator: &str) -> &Value {
        let matching: Vec<&Value> = self
            .all("ConfigMap")
            .into_iter()
            .filter(|o| {
                let name = o["metadata"]["name"].as_str().unwrap_or_default();
                name.strip_prefix(generator)
                    .and_then(|rest| rest.strip_prefix('-'))
                    .is_some_and(|hash| {
                        hash.len() == 10 && hash.chars().all(|c| c.is_ascii_alphanumeric())
                    })
            })
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "{}: one ConfigMap generated as {generator}",
            self.overlay
        );
        matching[0]
    }

    pub fn deployment(&self) -> &Value {
        self.named("Deployment", "tlserve")
    }

    pub fn pod_spec(&self) -> &Value {
        &self.deployment()["spec"]["template"]["spec"]
    }

    pub fn pod_labels(&self) -> BTreeMap<String, String> {
        labels_of(&self.deployment()["spec"]["template"]["metadata"]["labels"])
    }

    pub fn container(&self) -> &Value {
        find_named(
            &self.pod_spec()["containers"],
            "tlserve",
            "the pod's containers",
        )
    }

    pub fn init_container(&self, name: &str) -> &Value {
        find_named(
            &self.pod_spec()["initContainers"],
            name,
            "the pod's initContainers",
        )
    }

    pub fn volume(&self, name: &str) -> &Value {
        find_named(&self.pod_spec()["volumes"], name, "the pod's volumes")
    }

    /// The TLSERVE__* overrides in the server container's environment.
    pub fn server_env(&self) -> Vec<(String, String)> {
        let container = self.container();
        let mut vars: Vec<(String, String)> = container["env"]
            .as_array()
            .map(|vars| {
                vars.iter()
                    .filter(|v| text(&v["name"], "env name").starts_with("TLSERVE__"))
                    .map(|v| {
                        (
                            text(&v["name"], "env name").to_owned(),
                            text(&v["value"], "a TLSERVE__ value (valueFrom is not used)")
                                .to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        // ConfigMaps the container takes whole.
        for from in container["envFrom"].as_array().into_iter().flatten() {
            let Some(name) = from["configMapRef"]["name"].as_str() else {
                continue;
            };
            let data = &self.named("ConfigMap", name)["data"];
            for (key, value) in data.as_object().into_iter().flatten() {
                if key.starts_with("TLSERVE__") {
                    vars.push((key.clone(), text(value, "a ConfigMap value").to_owned()));
                }
            }
        }
        vars
    }

    /// The `--config` argument of the server container.
    pub fn config_path(&self) -> PathBuf {
        let args: Vec<&str> = list(&self.container()["args"], "args")
            .iter()
            .map(|a| text(a, "arg"))
            .collect();
        let at = args
            .iter()
            .position(|a| *a == "--config")
            .expect("the server container passes --config");
        assert_eq!(args[0], "serve", "the container runs `tlserve serve`");
        PathBuf::from(args[at + 1])
    }

    /// The server config file as the pod sees it, from the generated ConfigMap.
    pub fn config_text(&self) -> String {
        let path = self.config_path();
        let file = path.file_name().unwrap().to_str().unwrap();
        let map = self.generated_config_map("tlserve-config");
        text(&map["data"][file], "the config file in the ConfigMap").to_owned()
    }

    /// The server's configuration in the pod: the ConfigMap's TOML with the
    /// container's TLSERVE__* environment, parsed and validated by the server's
    /// own code.
    pub fn server_config(&self) -> Config {
        let path = self.config_path();
        Config::from_toml(
            &self.config_text(),
            path.parent().unwrap(),
            self.server_env(),
        )
        .unwrap_or_else(|err| panic!("{}: the server rejects its config: {err}", self.overlay))
    }

    /// The mount of `container` whose mountPath is `path` or a parent of it.
    pub fn mount_holding<'a>(&self, container: &'a Value, path: &Path) -> &'a Value {
        list(&container["volumeMounts"], "volumeMounts")
            .iter()
            .filter(|m| path.starts_with(text(&m["mountPath"], "mountPath")))
            .max_by_key(|m| text(&m["mountPath"], "mountPath").len())
            .unwrap_or_else(|| {
                panic!(
                    "{}: {} is on no volume of container {}",
                    self.overlay,
                    path.display(),
                    container["name"]
                )
            })
    }

    /// The PersistentVolumeClaim behind volume `name`.
    pub fn claim_of(&self, volume: &str) -> &Value {
        let claim = text(
            &self.volume(volume)["persistentVolumeClaim"]["claimName"],
            "a persistentVolumeClaim volume",
        );
        self.named("PersistentVolumeClaim", claim)
    }

    pub fn container_port(&self, name: &str) -> u64 {
        find_named(&self.container()["ports"], name, "container ports")["containerPort"]
            .as_u64()
            .expect("containerPort")
    }
}

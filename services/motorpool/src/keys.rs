//! `motorpool keys`: the gateway's API keys. A key is printed once, when it is made; the keys
//! file keeps only its SHA-256, and the gateway re-reads the file when it changes, so keys are
//! added, rotated (add the new one, move clients, remove the old) and revoked without a restart.
//!
//! `motorpool keys bus`: the services' NATS users. Each service connects with its own nkey seed
//! (a `.nk` file only it can read); the realm file lists every user's name, role and public key,
//! and `motorpool keys bus config` renders it as nats-server's `authorization` block, with each
//! role's subject permissions. nats-server re-reads it on `nats-server --signal reload`.

use anyhow::Context;
use clap::{Args, Subcommand};
use motorpool_bus::{Credentials, Realm, Role as BusRole};
use motorpool_gateway::auth::{KeyEntry, KeysFile, Role, hash_key, new_key};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Make a key, add its hash to the keys file and print the key (once).
    Add(AddArgs),
    /// List the keys (ids, roles, instances, lanes; never the keys).
    List(FileArg),
    /// Remove a key: its holder is refused from the gateway's next reload (within a second).
    Remove(RemoveArgs),
    /// The services' NATS users: add (or rotate), list, remove, render the server's config.
    #[command(subcommand)]
    Bus(BusCommand),
}

#[derive(Subcommand)]
pub enum BusCommand {
    /// Make an nkey for a service, write its seed (mode 0600) and add it to the realm; a user of
    /// the same name is replaced (a rotation).
    Add(BusAddArgs),
    /// List the realm's users (names, roles, public keys).
    List(RealmArg),
    /// Remove a user: the server refuses it after its next reload.
    Remove(BusRemoveArgs),
    /// Print nats-server's `authorization` block for the realm (include it in the server's
    /// configuration, then `nats-server --signal reload`).
    Config(RealmArg),
}

#[derive(Args)]
pub struct RealmArg {
    /// The realm file (TOML; made if missing).
    #[arg(long)]
    realm: PathBuf,
}

#[derive(Args)]
pub struct BusAddArgs {
    #[command(flatten)]
    realm: RealmArg,
    /// The user's name [default: from the role: its id, or the role].
    #[arg(long)]
    name: Option<String>,
    /// gateway, scheduler, reindexer, worker:<id>, shard:<id>, stage:<mapping|prelabel|annotate>,
    /// image-builder, burner:<id>, operator or admin.
    #[arg(long)]
    role: String,
    /// Where to write the seed; give it to the service as `--nats-nkey-file`.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct BusRemoveArgs {
    #[command(flatten)]
    realm: RealmArg,
    #[arg(long)]
    name: String,
}

#[derive(Args)]
pub struct FileArg {
    /// The keys file (the gateway's `auth.keys_file`).
    #[arg(long)]
    keys_file: PathBuf,
}

#[derive(Args)]
pub struct AddArgs {
    #[command(flatten)]
    file: FileArg,
    /// Who holds it (a team, a CI system): names its operations.
    #[arg(long)]
    id: String,
    /// Roles, comma-separated: read, write-cas, write-ac, execute, admin.
    #[arg(long, value_delimiter = ',', required = true)]
    roles: Vec<String>,
    /// Instance names it may use, comma-separated [default: all].
    #[arg(long, value_delimiter = ',')]
    instances: Vec<String>,
    /// The highest lane its executions may ride.
    #[arg(long, default_value = "release")]
    max_lane: String,
    /// Its executions are API-triggered: rate-limited under its id.
    #[arg(long)]
    api: bool,
}

#[derive(Args)]
pub struct RemoveArgs {
    #[command(flatten)]
    file: FileArg,
    /// The key's id.
    #[arg(long)]
    id: String,
}

fn read_or_empty(path: &Path) -> anyhow::Result<KeysFile> {
    if path.exists() {
        KeysFile::read(path)
    } else {
        Ok(KeysFile::default())
    }
}

fn role(name: &str) -> anyhow::Result<Role> {
    toml::Value::String(name.trim().to_string())
        .try_into()
        .with_context(|| {
            format!("{name:?} is not a role: use read, write-cas, write-ac, execute or admin")
        })
}

/// Adds a new key `id` with `roles` to the keys file and returns the key.
pub fn add(path: &Path, entry_of: impl FnOnce(String) -> KeyEntry) -> anyhow::Result<String> {
    let mut file = read_or_empty(path)?;
    let key = new_key();
    let entry = entry_of(hex::encode(hash_key(&key)));
    anyhow::ensure!(
        !file.keys.iter().any(|k| k.id == entry.id),
        "the keys file has a key {:?} already; remove it first to rotate",
        entry.id
    );
    file.keys.push(entry);
    file.write(path)?;
    Ok(key)
}

fn bus_main(cmd: BusCommand) -> anyhow::Result<()> {
    match cmd {
        BusCommand::Add(a) => {
            let role: BusRole = a.role.parse()?;
            let name = a.name.unwrap_or_else(|| role.default_name());
            let mut realm = Realm::load(&a.realm.realm)?;
            let rotated = realm.users.iter().any(|u| u.name == name);
            let creds = Credentials::generate();
            creds
                .save(&a.out)
                .with_context(|| format!("write {}", a.out.display()))?;
            realm.upsert(&name, role.clone(), creds.public_key());
            realm.save(&a.realm.realm)?;
            eprintln!(
                "{} bus user {name:?} ({role}) in {}; its seed is in {}.\nRender the server's \
                 configuration with `motorpool keys bus config --realm {}` and reload it \
                 (`nats-server --signal reload`).",
                if rotated { "Rotated" } else { "Added" },
                a.realm.realm.display(),
                a.out.display(),
                a.realm.realm.display(),
            );
            println!("{}", creds.public_key());
        }
        BusCommand::List(r) => {
            for u in Realm::load(&r.realm)?.users {
                println!("{}\t{}\t{}", u.name, u.role, u.nkey);
            }
        }
        BusCommand::Remove(r) => {
            let mut realm = Realm::load(&r.realm.realm)?;
            realm.remove(&r.name)?;
            realm.save(&r.realm.realm)?;
            eprintln!(
                "Removed bus user {:?}; reload the server to refuse it.",
                r.name
            );
        }
        BusCommand::Config(r) => print!("{}", Realm::load(&r.realm)?.server_config()),
    }
    Ok(())
}

pub fn main(cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Bus(b) => return bus_main(b),
        KeysCommand::Add(a) => {
            let roles = a
                .roles
                .iter()
                .map(|r| role(r))
                .collect::<anyhow::Result<Vec<_>>>()?;
            anyhow::ensure!(
                motorpool_messages::exec::Lane::from_name(&a.max_lane).is_some(),
                "--max-lane {:?} is not release, build, test or lint",
                a.max_lane
            );
            let key = add(&a.file.keys_file, |sha256| KeyEntry {
                id: a.id.clone(),
                sha256,
                roles,
                instances: a.instances.clone(),
                max_lane: a.max_lane.clone(),
                api: a.api,
            })?;
            eprintln!(
                "Added key {:?} to {}. It is shown only now:",
                a.id,
                a.file.keys_file.display()
            );
            println!("{key}");
            eprintln!("Bazel: --remote_header=authorization=Bearer {key}");
        }
        KeysCommand::List(f) => {
            for k in read_or_empty(&f.keys_file)?.keys {
                let instances = if k.instances.is_empty() {
                    "all instances".to_string()
                } else {
                    k.instances.join(",")
                };
                let roles: Vec<String> = k.roles.iter().map(|r| format!("{r:?}")).collect();
                println!(
                    "{}\troles {}\t{instances}\tlanes up to {}{}",
                    k.id,
                    roles.join(","),
                    k.max_lane,
                    if k.api { "\tAPI-triggered" } else { "" }
                );
            }
        }
        KeysCommand::Remove(r) => {
            let mut file = read_or_empty(&r.file.keys_file)?;
            let before = file.keys.len();
            file.keys.retain(|k| k.id != r.id);
            anyhow::ensure!(
                file.keys.len() < before,
                "no key {:?} in {}",
                r.id,
                r.file.keys_file.display()
            );
            file.write(&r.file.keys_file)?;
            eprintln!("Removed key {:?}.", r.id);
        }
    }
    Ok(())
}

/// The keys `motorpool up` makes at its first start, kept (readable by root only) in
/// `<data dir>/credentials.toml` beside the gateway's `keys.toml`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct StackKeys {
    /// Read, write the CAS, execute up to the build lane: a developer's builds.
    pub developer: String,
    /// Also write the action cache, any lane: CI.
    pub ci: String,
    /// Everything, and every caller's operations.
    pub admin: String,
}

/// The stack's keys: those made before, or new ones (replacing entries of the same ids whose
/// plaintext was lost; keys an operator added stay).
pub fn stack_keys(data_dir: &Path) -> anyhow::Result<(PathBuf, StackKeys)> {
    use std::os::unix::fs::PermissionsExt;
    let keys_file = data_dir.join("keys.toml");
    let creds = data_dir.join("credentials.toml");
    if keys_file.exists()
        && let Ok(text) = std::fs::read_to_string(&creds)
    {
        return Ok((
            keys_file,
            toml::from_str(&text).context("read credentials.toml")?,
        ));
    }
    let [developer, ci, admin] = replace_keys(
        &keys_file,
        [
            (
                "developer",
                vec![Role::Read, Role::WriteCas, Role::Execute],
                "build",
            ),
            (
                "ci",
                vec![Role::Read, Role::WriteCas, Role::WriteAc, Role::Execute],
                "release",
            ),
            ("admin", vec![Role::Admin], "release"),
        ],
    )?;
    let keys = StackKeys {
        developer,
        ci,
        admin,
    };
    std::fs::write(&creds, toml::to_string(&keys)?)?;
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600))?;
    Ok((keys_file, keys))
}

/// The API keys of the stack's CI runner, in `<data dir>/runner/{trusted,untrusted}.key` (mode
/// 0600), made at the first start: `runner-trusted` may write the action cache (pushes to
/// protected branches, tags), `runner-mr` may not (merge requests, whose code nobody has
/// reviewed). Both may execute on any lane: the lane comes from the job.
pub fn stack_runner_keys(data_dir: &Path, keys_file: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = data_dir.join("runner");
    let (trusted, untrusted) = (dir.join("trusted.key"), dir.join("untrusted.key"));
    if trusted.exists() && untrusted.exists() {
        return Ok((trusted, untrusted));
    }
    let [trusted_key, untrusted_key] = replace_keys(
        keys_file,
        [
            (
                "runner-trusted",
                vec![Role::Read, Role::WriteCas, Role::WriteAc, Role::Execute],
                "release",
            ),
            (
                "runner-mr",
                vec![Role::Read, Role::WriteCas, Role::Execute],
                "release",
            ),
        ],
    )?;
    motorpool_bus::access::write_private(&trusted, trusted_key.as_bytes())?;
    motorpool_bus::access::write_private(&untrusted, untrusted_key.as_bytes())?;
    Ok((trusted, untrusted))
}

/// Makes new keys in `keys_file` for these ids (id, roles, highest lane), replacing any keys
/// of the same ids; the new keys, in order.
fn replace_keys<const N: usize>(
    keys_file: &Path,
    entries: [(&str, Vec<Role>, &str); N],
) -> anyhow::Result<[String; N]> {
    let mut file = read_or_empty(keys_file)?;
    file.keys
        .retain(|k| !entries.iter().any(|(id, _, _)| *id == k.id));
    file.write(keys_file)?;
    let mut keys = Vec::with_capacity(N);
    for (id, roles, lane) in entries {
        keys.push(add(keys_file, |sha256| KeyEntry {
            id: id.into(),
            sha256,
            roles,
            instances: Vec::new(),
            max_lane: lane.into(),
            api: false,
        })?);
    }
    Ok(keys.try_into().expect("one key per entry"))
}

/// The stack's bus users: one per service `motorpool up` runs (`services`: name and role), and
/// `operator` and `admin` for people, with seeds in `<data dir>/bus/<name>.nk`. Users made
/// before are kept; missing or unreadable seeds are made anew. Returns the realm (for the
/// server) and the seed file of each name.
pub fn stack_bus(
    data_dir: &Path,
    services: &[(String, BusRole)],
) -> anyhow::Result<(Realm, std::collections::HashMap<String, PathBuf>)> {
    let dir = data_dir.join("bus");
    std::fs::create_dir_all(&dir)?;
    let realm_file = dir.join("realm.toml");
    let mut realm = Realm::load(&realm_file)?;
    let mut seeds = std::collections::HashMap::new();
    let people = [
        ("operator".to_string(), BusRole::Operator),
        ("admin".to_string(), BusRole::Admin),
    ];
    for (name, role) in services.iter().chain(people.iter()) {
        let path = dir.join(format!("{name}.nk"));
        let known = Credentials::load(&path).ok().filter(|c| {
            realm
                .users
                .iter()
                .any(|u| &u.name == name && &u.role == role && u.nkey == c.public_key())
        });
        if known.is_none() {
            let c = Credentials::generate();
            c.save(&path)
                .with_context(|| format!("write {}", path.display()))?;
            realm.upsert(name, role.clone(), c.public_key());
        }
        seeds.insert(name.clone(), path);
    }
    realm.save(&realm_file)?;
    Ok((realm, seeds))
}

/// The stack's data key (`<data dir>/bus/data.key`, 64 hex digits, mode 0600): made at the
/// first start, kept after.
pub fn stack_data_key(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let path = data_dir.join("bus/data.key");
    if motorpool_messages::cas::read_data_key(&path).is_err() {
        let key: [u8; 32] = rand::random();
        motorpool_bus::access::write_private(&path, format!("{}\n", hex::encode(key)).as_bytes())
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(path)
}

//! The libvirt procedures the agent calls, each as a typed method of [`Connection`]: the
//! procedure number and the XDR of its arguments and reply, as `remote_protocol.x` defines
//! them. Each method takes libvirt's public call name (`lookupByName`, ...) for its errors.

use super::client::{Connection, RpcError};
use super::xdr::{Decoder, Encoder, XdrError};
use crate::libvirt::blockjob::JobProgress;
use crate::libvirt::LibvirtError;

mod number {
    pub const CONNECT_OPEN: i32 = 1;
    pub const CONNECT_GET_VERSION: i32 = 4;
    pub const CONNECT_GET_CAPABILITIES: i32 = 7;
    pub const DOMAIN_DEFINE_XML: i32 = 11;
    pub const DOMAIN_DESTROY: i32 = 12;
    pub const DOMAIN_GET_XML_DESC: i32 = 14;
    pub const DOMAIN_LOOKUP_BY_NAME: i32 = 23;
    pub const DOMAIN_RESUME: i32 = 28;
    pub const DOMAIN_SHUTDOWN: i32 = 33;
    pub const DOMAIN_SUSPEND: i32 = 34;
    pub const AUTH_LIST: i32 = 66;
    pub const AUTH_POLKIT: i32 = 70;
    pub const SECRET_LOOKUP_BY_UUID: i32 = 141;
    pub const SECRET_DEFINE_XML: i32 = 142;
    pub const SECRET_SET_VALUE: i32 = 144;
    pub const SECRET_GET_VALUE: i32 = 145;
    pub const SECRET_UNDEFINE: i32 = 146;
    pub const DOMAIN_IS_PERSISTENT: i32 = 151;
    pub const CONNECT_GET_LIB_VERSION: i32 = 157;
    pub const DOMAIN_ATTACH_DEVICE_FLAGS: i32 = 160;
    pub const DOMAIN_DETACH_DEVICE_FLAGS: i32 = 161;
    pub const DOMAIN_ABORT_JOB: i32 = 164;
    pub const DOMAIN_UPDATE_DEVICE_FLAGS: i32 = 174;
    pub const DOMAIN_SNAPSHOT_CREATE_XML: i32 = 185;
    pub const DOMAIN_CREATE_WITH_FLAGS: i32 = 196;
    pub const DOMAIN_GET_STATE: i32 = 212;
    pub const DOMAIN_UNDEFINE_FLAGS: i32 = 231;
    pub const DOMAIN_BLOCK_JOB_ABORT: i32 = 237;
    pub const DOMAIN_GET_BLOCK_JOB_INFO: i32 = 238;
    pub const DOMAIN_BLOCK_REBASE: i32 = 266;
    pub const CONNECT_LIST_ALL_DOMAINS: i32 = 273;
    pub const DOMAIN_BLOCK_COMMIT: i32 = 290;
    pub const DOMAIN_GET_JOB_STATS: i32 = 298;
    pub const DOMAIN_FSFREEZE: i32 = 335;
    pub const DOMAIN_FSTHAW: i32 = 336;
    pub const CONNECT_GET_DOMAIN_CAPABILITIES: i32 = 342;
    pub const DOMAIN_CHECKPOINT_CREATE_XML: i32 = 411;
    pub const DOMAIN_LIST_ALL_CHECKPOINTS: i32 = 413;
    pub const DOMAIN_CHECKPOINT_LOOKUP_BY_NAME: i32 = 415;
    pub const DOMAIN_CHECKPOINT_DELETE: i32 = 417;
    pub const DOMAIN_AGENT_SET_RESPONSE_TIMEOUT: i32 = 420;
    pub const DOMAIN_BACKUP_BEGIN: i32 = 421;
}

/// Generous bounds on the lists a reply may carry (libvirt's own are lower).
const LIST_MAX: u32 = 65_536;
/// `REMOTE_SECRET_VALUE_MAX`.
const SECRET_VALUE_MAX: u32 = 65_536;

/// Authentication a daemon socket may ask for (`remote_auth_type`).
const AUTH_NONE: i32 = 0;
const AUTH_SASL: i32 = 1;
const AUTH_POLKIT: i32 = 2;

/// A domain as the protocol names it (`remote_nonnull_domain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    pub name: String,
    uuid: [u8; 16],
    id: i32,
}

impl Domain {
    fn encode(&self, e: &mut Encoder) {
        e.str(&self.name).fixed(&self.uuid).i32(self.id);
    }

    fn decode(d: &mut Decoder) -> Result<Domain, XdrError> {
        Ok(Domain { name: d.string("domain name")?, uuid: d.fixed("domain uuid")?, id: d.i32("domain id")? })
    }
}

/// A checkpoint of a domain (`remote_nonnull_domain_checkpoint`).
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub name: String,
    dom: Domain,
}

impl Checkpoint {
    fn decode(d: &mut Decoder) -> Result<Checkpoint, XdrError> {
        Ok(Checkpoint { name: d.string("checkpoint name")?, dom: Domain::decode(d)? })
    }
}

/// A secret (`remote_nonnull_secret`).
#[derive(Debug, Clone)]
pub struct Secret {
    uuid: [u8; 16],
    pub usage_type: i32,
    usage_id: String,
}

impl Secret {
    fn encode(&self, e: &mut Encoder) {
        e.fixed(&self.uuid).i32(self.usage_type).str(&self.usage_id);
    }

    fn decode(d: &mut Decoder) -> Result<Secret, XdrError> {
        Ok(Secret {
            uuid: d.fixed("secret uuid")?,
            usage_type: d.i32("secret usage type")?,
            usage_id: d.string("secret usage id")?,
        })
    }
}

/// Checks a list of typed parameters (`remote_typed_param`) as far as the protocol says.
fn skip_typed_params(d: &mut Decoder) -> Result<(), XdrError> {
    d.array("typed parameters", LIST_MAX, |d| {
        d.string("parameter name")?;
        match d.i32("parameter type")? {
            1 | 2 | 6 => d.u32("parameter value").map(drop),
            3..=5 => d.u64("parameter value").map(drop),
            7 => d.string("parameter value").map(drop),
            t => Err(XdrError::BadValue { what: "parameter type", value: t.into() }),
        }
    })
    .map(drop)
}

fn unit(_: &mut Decoder) -> Result<(), XdrError> {
    Ok(())
}

fn string(d: &mut Decoder) -> Result<String, XdrError> {
    d.string("string")
}

fn int(d: &mut Decoder) -> Result<i32, XdrError> {
    d.i32("int")
}

impl Connection {
    /// One call: encodes the arguments, waits for the reply and decodes it.
    fn invoke<T>(
        &self,
        call: &'static str,
        procedure: i32,
        args: impl FnOnce(&mut Encoder),
        ret: impl FnOnce(&mut Decoder) -> Result<T, XdrError>,
    ) -> Result<T, LibvirtError> {
        let mut e = Encoder::new();
        args(&mut e);
        if e.has_nul() {
            return Err(LibvirtError::Call {
                call,
                message: "an argument contains a NUL character".into(),
                code: crate::libvirt::code::INVALID_ARG,
            });
        }
        let reply = self.call(procedure, &e.into_bytes()).map_err(|e| LibvirtError::from_rpc(call, e))?;
        ret(&mut Decoder::new(&reply)).map_err(|e| LibvirtError::from_rpc(call, RpcError::Reply(e)))
    }

    /// Authenticates (none, or polkit as root on the unix socket) and opens `name`, as
    /// libvirt's client does before any other call.
    pub fn open(&self, name: &str) -> Result<(), LibvirtError> {
        let kinds =
            self.invoke("authList", number::AUTH_LIST, |_| {}, |d| d.array("auth types", 20, |d| d.i32("auth")))?;
        if kinds.contains(&AUTH_POLKIT) && !kinds.contains(&AUTH_NONE) {
            let complete = self.invoke("authPolkit", number::AUTH_POLKIT, |_| {}, int)?;
            if complete == 0 {
                return Err(LibvirtError::Call {
                    call: "authPolkit",
                    message: "polkit did not grant access to the daemon's socket".into(),
                    code: crate::libvirt::code::AUTH_FAILED,
                });
            }
        } else if !kinds.is_empty() && !kinds.contains(&AUTH_NONE) {
            let asked = if kinds.contains(&AUTH_SASL) { "SASL".to_string() } else { format!("{kinds:?}") };
            return Err(LibvirtError::Call {
                call: "authList",
                message: format!(
                    "the daemon's socket asks for {asked} authentication; the agent supports none and polkit \
                     (set auth_unix_rw to \"none\" or \"polkit\" in the daemon's configuration)"
                ),
                code: crate::libvirt::code::AUTH_FAILED,
            });
        }
        self.invoke(
            "open",
            number::CONNECT_OPEN,
            |e| {
                e.opt_str(Some(name)).u32(0);
            },
            unit,
        )
    }

    pub fn lib_version(&self) -> Result<u64, LibvirtError> {
        self.invoke("getLibVersion", number::CONNECT_GET_LIB_VERSION, |_| {}, |d| d.u64("version"))
    }

    pub fn hyp_version(&self) -> Result<u64, LibvirtError> {
        self.invoke("getVersion", number::CONNECT_GET_VERSION, |_| {}, |d| d.u64("version"))
    }

    pub fn capabilities(&self) -> Result<String, LibvirtError> {
        self.invoke("getCapabilities", number::CONNECT_GET_CAPABILITIES, |_| {}, string)
    }

    pub fn domain_capabilities(&self, arch: &str, machine: &str, virt_type: &str) -> Result<String, LibvirtError> {
        self.invoke(
            "getDomainCapabilities",
            number::CONNECT_GET_DOMAIN_CAPABILITIES,
            |e| {
                e.opt_str(None).opt_str(Some(arch)).opt_str(Some(machine)).opt_str(Some(virt_type)).u32(0);
            },
            string,
        )
    }

    pub fn lookup_domain(&self, name: &str) -> Result<Domain, LibvirtError> {
        self.invoke(
            "lookupByName",
            number::DOMAIN_LOOKUP_BY_NAME,
            |e| {
                e.str(name);
            },
            Domain::decode,
        )
    }

    pub fn list_all_domains(&self) -> Result<Vec<Domain>, LibvirtError> {
        self.invoke(
            "listAllDomains",
            number::CONNECT_LIST_ALL_DOMAINS,
            |e| {
                e.i32(1).u32(0);
            },
            |d| {
                let domains = d.array("domains", LIST_MAX, Domain::decode)?;
                d.u32("count")?;
                Ok(domains)
            },
        )
    }

    /// libvirt's `virDomainState` of `dom`.
    pub fn domain_state(&self, dom: &Domain) -> Result<i32, LibvirtError> {
        self.invoke(
            "getState",
            number::DOMAIN_GET_STATE,
            |e| {
                dom.encode(e);
                e.u32(0);
            },
            |d| {
                let state = d.i32("state")?;
                d.i32("reason")?;
                Ok(state)
            },
        )
    }

    pub fn define_domain(&self, xml: &str) -> Result<(), LibvirtError> {
        self.invoke(
            "defineXML",
            number::DOMAIN_DEFINE_XML,
            |e| {
                e.str(xml);
            },
            |d| Domain::decode(d).map(drop),
        )
    }

    pub fn create_domain(&self, dom: &Domain, flags: u32) -> Result<(), LibvirtError> {
        self.invoke(
            "create",
            number::DOMAIN_CREATE_WITH_FLAGS,
            |e| with_flags(e, dom, flags),
            |d| Domain::decode(d).map(drop),
        )
    }

    pub fn domain_xml(&self, dom: &Domain) -> Result<String, LibvirtError> {
        self.invoke("getXMLDesc", number::DOMAIN_GET_XML_DESC, |e| with_flags(e, dom, 0), string)
    }

    pub fn destroy_domain(&self, dom: &Domain) -> Result<(), LibvirtError> {
        self.invoke("destroy", number::DOMAIN_DESTROY, |e| dom.encode(e), unit)
    }

    pub fn shutdown_domain(&self, dom: &Domain) -> Result<(), LibvirtError> {
        self.invoke("shutdown", number::DOMAIN_SHUTDOWN, |e| dom.encode(e), unit)
    }

    pub fn suspend_domain(&self, dom: &Domain) -> Result<(), LibvirtError> {
        self.invoke("suspend", number::DOMAIN_SUSPEND, |e| dom.encode(e), unit)
    }

    pub fn resume_domain(&self, dom: &Domain) -> Result<(), LibvirtError> {
        self.invoke("resume", number::DOMAIN_RESUME, |e| dom.encode(e), unit)
    }

    pub fn undefine_domain(&self, dom: &Domain, flags: u32) -> Result<(), LibvirtError> {
        self.invoke("undefine", number::DOMAIN_UNDEFINE_FLAGS, |e| with_flags(e, dom, flags), unit)
    }

    pub fn domain_is_persistent(&self, dom: &Domain) -> Result<bool, LibvirtError> {
        self.invoke("isPersistent", number::DOMAIN_IS_PERSISTENT, |e| dom.encode(e), |d| Ok(int(d)? != 0))
    }

    /// Attaches, detaches or updates the device `xml` describes.
    pub fn change_device(&self, call: DeviceCall, dom: &Domain, xml: &str, flags: u32) -> Result<(), LibvirtError> {
        let procedure = match call {
            DeviceCall::Attach => number::DOMAIN_ATTACH_DEVICE_FLAGS,
            DeviceCall::Detach => number::DOMAIN_DETACH_DEVICE_FLAGS,
            DeviceCall::Update => number::DOMAIN_UPDATE_DEVICE_FLAGS,
        };
        self.invoke(
            call.name(),
            procedure,
            |e| {
                dom.encode(e);
                e.str(xml).u32(flags);
            },
            unit,
        )
    }

    pub fn create_snapshot(&self, dom: &Domain, xml: &str, flags: u32) -> Result<(), LibvirtError> {
        self.invoke(
            "snapshotCreateXML",
            number::DOMAIN_SNAPSHOT_CREATE_XML,
            |e| {
                dom.encode(e);
                e.str(xml).u32(flags);
            },
            |d| {
                d.string("snapshot name")?;
                Domain::decode(d).map(drop)
            },
        )
    }

    pub fn block_rebase(&self, dom: &Domain, disk: &str, base: Option<&str>, flags: u32) -> Result<(), LibvirtError> {
        self.invoke(
            "blockRebase",
            number::DOMAIN_BLOCK_REBASE,
            |e| {
                dom.encode(e);
                e.str(disk).opt_str(base).u64(0).u32(flags);
            },
            unit,
        )
    }

    /// Commits `disk` with libvirt's default base and top (the active layer into its backing
    /// file, with the ACTIVE and SHALLOW flags).
    pub fn block_commit(&self, dom: &Domain, disk: &str, flags: u32) -> Result<(), LibvirtError> {
        self.invoke(
            "blockCommit",
            number::DOMAIN_BLOCK_COMMIT,
            |e| {
                dom.encode(e);
                e.str(disk).opt_str(None).opt_str(None).u64(0).u32(flags);
            },
            unit,
        )
    }

    /// The block job on `disk`, or `None` when there is none.
    pub fn block_job_info(&self, dom: &Domain, disk: &str) -> Result<Option<JobProgress>, LibvirtError> {
        self.invoke(
            "getBlockJobInfo",
            number::DOMAIN_GET_BLOCK_JOB_INFO,
            |e| {
                dom.encode(e);
                e.str(disk).u32(0);
            },
            |d| {
                let found = d.i32("found")?;
                d.i32("job type")?;
                d.u64("bandwidth")?;
                let (cur, end) = (d.u64("cur")?, d.u64("end")?);
                Ok((found != 0).then_some(JobProgress { cur, end }))
            },
        )
    }

    pub fn block_job_abort(&self, dom: &Domain, disk: &str, flags: u32) -> Result<(), LibvirtError> {
        self.invoke(
            "blockJobAbort",
            number::DOMAIN_BLOCK_JOB_ABORT,
            |e| {
                dom.encode(e);
                e.str(disk).u32(flags);
            },
            unit,
        )
    }

    pub fn backup_begin(&self, dom: &Domain, backup: &str, checkpoint: &str, flags: u32) -> Result<(), LibvirtError> {
        self.invoke(
            "backupBegin",
            number::DOMAIN_BACKUP_BEGIN,
            |e| {
                dom.encode(e);
                e.str(backup).opt_str(Some(checkpoint)).u32(flags);
            },
            unit,
        )
    }

    /// The type (`virDomainJobType`) of the domain's job; the statistics are checked, not kept.
    pub fn job_type(&self, dom: &Domain, flags: u32) -> Result<i32, LibvirtError> {
        self.invoke(
            "getJobStats",
            number::DOMAIN_GET_JOB_STATS,
            |e| with_flags(e, dom, flags),
            |d| {
                let kind = d.i32("job type")?;
                skip_typed_params(d)?;
                Ok(kind)
            },
        )
    }

    pub fn abort_job(&self, dom: &Domain) -> Result<(), LibvirtError> {
        self.invoke("abortJob", number::DOMAIN_ABORT_JOB, |e| dom.encode(e), unit)
    }

    pub fn create_checkpoint(&self, dom: &Domain, xml: &str, flags: u32) -> Result<(), LibvirtError> {
        self.invoke(
            "checkpointCreateXML",
            number::DOMAIN_CHECKPOINT_CREATE_XML,
            |e| {
                dom.encode(e);
                e.str(xml).u32(flags);
            },
            |d| Checkpoint::decode(d).map(drop),
        )
    }

    pub fn list_checkpoints(&self, dom: &Domain) -> Result<Vec<Checkpoint>, LibvirtError> {
        self.invoke(
            "listAllCheckpoints",
            number::DOMAIN_LIST_ALL_CHECKPOINTS,
            |e| {
                dom.encode(e);
                e.i32(1).u32(0);
            },
            |d| {
                let list = d.array("checkpoints", LIST_MAX, Checkpoint::decode)?;
                d.i32("count")?;
                Ok(list)
            },
        )
    }

    pub fn lookup_checkpoint(&self, dom: &Domain, name: &str) -> Result<Checkpoint, LibvirtError> {
        self.invoke(
            "checkpointLookupByName",
            number::DOMAIN_CHECKPOINT_LOOKUP_BY_NAME,
            |e| {
                dom.encode(e);
                e.str(name).u32(0);
            },
            Checkpoint::decode,
        )
    }

    pub fn delete_checkpoint(&self, cp: &Checkpoint, flags: u32) -> Result<(), LibvirtError> {
        self.invoke(
            "checkpointDelete",
            number::DOMAIN_CHECKPOINT_DELETE,
            |e| {
                e.str(&cp.name);
                cp.dom.encode(e);
                e.u32(flags);
            },
            unit,
        )
    }

    pub fn lookup_secret(&self, uuid: &str) -> Result<Secret, LibvirtError> {
        let bytes = uuid::Uuid::parse_str(uuid).map_err(|e| LibvirtError::Call {
            call: "secretLookupByUUID",
            message: format!("secret uuid {uuid:?} is not a uuid: {e}"),
            code: crate::libvirt::code::INVALID_ARG,
        })?;
        self.invoke(
            "secretLookupByUUID",
            number::SECRET_LOOKUP_BY_UUID,
            |e| {
                e.fixed(bytes.as_bytes());
            },
            Secret::decode,
        )
    }

    pub fn define_secret(&self, xml: &str) -> Result<Secret, LibvirtError> {
        self.invoke(
            "secretDefineXML",
            number::SECRET_DEFINE_XML,
            |e| {
                e.str(xml).u32(0);
            },
            Secret::decode,
        )
    }

    pub fn set_secret_value(&self, s: &Secret, value: &[u8]) -> Result<(), LibvirtError> {
        self.invoke(
            "secretSetValue",
            number::SECRET_SET_VALUE,
            |e| {
                s.encode(e);
                e.opaque(value).u32(0);
            },
            unit,
        )
    }

    pub fn secret_value(&self, s: &Secret) -> Result<Vec<u8>, LibvirtError> {
        self.invoke(
            "secretGetValue",
            number::SECRET_GET_VALUE,
            |e| {
                s.encode(e);
                e.u32(0);
            },
            |d| d.opaque("secret value", SECRET_VALUE_MAX),
        )
    }

    pub fn undefine_secret(&self, s: &Secret) -> Result<(), LibvirtError> {
        self.invoke("secretUndefine", number::SECRET_UNDEFINE, |e| s.encode(e), unit)
    }

    pub fn set_agent_timeout(&self, dom: &Domain, seconds: i32) -> Result<(), LibvirtError> {
        self.invoke(
            "domainAgentSetResponseTimeout",
            number::DOMAIN_AGENT_SET_RESPONSE_TIMEOUT,
            |e| {
                dom.encode(e);
                e.i32(seconds).u32(0);
            },
            |d| int(d).map(drop),
        )
    }

    /// Freezes (or thaws) every filesystem of the guest; returns how many.
    pub fn fs_freeze(&self, dom: &Domain, freeze: bool) -> Result<i32, LibvirtError> {
        let (call, procedure) =
            if freeze { ("domainFSFreeze", number::DOMAIN_FSFREEZE) } else { ("domainFSThaw", number::DOMAIN_FSTHAW) };
        self.invoke(
            call,
            procedure,
            |e| {
                dom.encode(e);
                e.u32(0).u32(0);
            },
            int,
        )
    }
}

/// A domain and a flags word, the arguments of many calls.
fn with_flags(e: &mut Encoder, dom: &Domain, flags: u32) {
    dom.encode(e);
    e.u32(flags);
}

/// The three device calls, which take the same arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceCall {
    Attach,
    Detach,
    Update,
}

impl DeviceCall {
    pub fn name(self) -> &'static str {
        match self {
            DeviceCall::Attach => "attachDeviceFlags",
            DeviceCall::Detach => "detachDeviceFlags",
            DeviceCall::Update => "updateDeviceFlags",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_parameters_of_every_type_are_read_and_unknown_types_refused() {
        let mut e = Encoder::new();
        e.u32(7);
        for (name, kind) in [("i", 1), ("u", 2), ("l", 3), ("ul", 4), ("d", 5), ("b", 6)] {
            e.str(name).i32(kind);
            if (3..=5).contains(&kind) {
                e.u64(1);
            } else {
                e.u32(1);
            }
        }
        e.str("s").i32(7).str("text");
        let bytes = e.into_bytes();
        let mut d = Decoder::new(&bytes);
        skip_typed_params(&mut d).unwrap();
        assert_eq!(d.remaining(), 0);

        let mut e = Encoder::new();
        e.u32(1).str("x").i32(9).u32(0);
        assert!(matches!(
            skip_typed_params(&mut Decoder::new(&e.into_bytes())),
            Err(XdrError::BadValue { what: "parameter type", value: 9 })
        ));
    }

    #[test]
    fn a_domain_round_trips() {
        let dom = Domain { name: "a".repeat(32), uuid: [7; 16], id: -1 };
        let mut e = Encoder::new();
        dom.encode(&mut e);
        assert_eq!(Domain::decode(&mut Decoder::new(&e.into_bytes())).unwrap(), dom);
    }
}

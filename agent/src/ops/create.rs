//! Native `/vm/create`: root and data volumes (each a thin overlay on a cached image, a thick
//! copy, or empty), then the domain per strategy — all or nothing (see [`super::assemble`]).

use super::assemble::{self, NewVm, Source};
use super::volumes;
use crate::app::App;
use crate::error::{AgentError, AgentResult};
use crate::qemu_img::CreateOptions;
use crate::storage::local::{check_size, Provisioning};
use crate::storage::location::Location;
use crate::tasks::TaskCtx;
use crate::wire::inventory::VmInstanceInventory;
use crate::wire::native::{CreateVmCmd, Provisioning as WireProvisioning, VolumeSpec};

pub(super) fn provisioning(p: WireProvisioning) -> Provisioning {
    match p {
        WireProvisioning::Thin => Provisioning::Thin,
        WireProvisioning::Thick => Provisioning::Thick,
    }
}

/// The root and the data volumes, each with the field that names it in errors.
fn volumes(cmd: &CreateVmCmd) -> impl Iterator<Item = (&VolumeSpec, String)> {
    std::iter::once((&cmd.root_volume, "rootVolume".to_owned()))
        .chain(cmd.data_volumes.iter().enumerate().map(|(i, d)| (d, format!("dataVolumes[{i}]"))))
}

/// The checks of the sources; the targets are checked by [`assemble::create_vm`].
async fn check_sources(app: &App, ctx: &TaskCtx, cmd: &CreateVmCmd) -> AgentResult<()> {
    for (v, field) in volumes(cmd) {
        match (&v.image_path, v.size) {
            (Some(image), _) => volumes::store(app, image)?
                .check_image(image, &ctx.stop)
                .await
                .map_err(|e| e.context(format!("{field}.imagePath")))?,
            (None, Some(s)) if s > 0 => {}
            (None, _) => return Err(AgentError::invalid(format!("{field} needs imagePath or a size > 0"))),
        }
        // Every size before the first volume is made.
        if !Location::is_rbd(&v.install_path) {
            check_size(v.size.unwrap_or(0), &CreateOptions::default()).map_err(|e| e.context(field))?;
        }
    }
    Ok(())
}

/// What the volume is made from: its image (a thin overlay or a thick copy, grown to `size`),
/// or nothing (an empty volume of `size`).
fn source(v: &VolumeSpec) -> Source {
    let provisioning = provisioning(v.provisioning);
    match &v.image_path {
        Some(image) => Source::Image { image: image.clone(), size: v.size, provisioning },
        None => Source::Empty { size: v.size.unwrap_or(0), provisioning },
    }
}

pub async fn create(app: &App, ctx: &TaskCtx, cmd: CreateVmCmd) -> AgentResult<VmInstanceInventory> {
    let mut spec = cmd.to_spec()?;
    super::cloud_init::for_new_vm(app, &mut spec, cmd.cloud_init.as_ref())?;
    check_sources(app, ctx, &cmd).await?;
    let sources: Vec<Source> = volumes(&cmd).map(|(v, _)| source(v)).collect();
    let new = NewVm { spec: &spec, sources: &sources, tpm_from: None, nvram_from: None, strategy: cmd.strategy };
    assemble::create_vm(app, ctx, new).await
}

//! Native `/vm/create`: root volume (thin overlay on a cached image, thick copy, or empty), data
//! volumes, then the domain per strategy — all or nothing (see [`super::assemble`]).

use super::assemble::{self, NewVm, Source};
use super::volumes;
use crate::app::App;
use crate::error::{AgentError, AgentResult};
use crate::qemu_img::CreateOptions;
use crate::storage::local::{check_size, Provisioning};
use crate::storage::location::Location;
use crate::tasks::TaskCtx;
use crate::wire::inventory::VmInstanceInventory;
use crate::wire::native::{CreateVmCmd, Provisioning as WireProvisioning};

pub(super) fn provisioning(p: WireProvisioning) -> Provisioning {
    match p {
        WireProvisioning::Thin => Provisioning::Thin,
        WireProvisioning::Thick => Provisioning::Thick,
    }
}

/// The checks of the sources; the targets are checked by [`assemble::create_vm`].
async fn check_sources(app: &App, ctx: &TaskCtx, cmd: &CreateVmCmd) -> AgentResult<()> {
    match (&cmd.root_volume.image_path, cmd.root_volume.size) {
        (Some(image), _) => volumes::store(app, image)?
            .check_image(image, &ctx.stop)
            .await
            .map_err(|e| e.context("rootVolume.imagePath"))?,
        (None, Some(s)) if s > 0 => {}
        (None, _) => return Err(AgentError::invalid("rootVolume needs imagePath or a size > 0")),
    }
    if let Some((i, _)) = cmd.data_volumes.iter().enumerate().find(|(_, d)| d.size == 0) {
        return Err(AgentError::invalid(format!("dataVolumes[{i}].size must be greater than 0")));
    }
    // Every size at once, so that a bad one is refused before the first volume is made.
    let files =
        std::iter::once((&cmd.root_volume.install_path, cmd.root_volume.size.unwrap_or(0), "rootVolume".to_owned()))
            .chain(
                cmd.data_volumes
                    .iter()
                    .enumerate()
                    .map(|(i, d)| (&d.install_path, d.size, format!("dataVolumes[{i}]"))),
            )
            .filter(|(path, _, _)| !Location::is_rbd(path));
    for (_, size, field) in files {
        check_size(size, &CreateOptions::default()).map_err(|e| e.context(field))?;
    }
    Ok(())
}

pub async fn create(app: &App, ctx: &TaskCtx, cmd: CreateVmCmd) -> AgentResult<VmInstanceInventory> {
    let spec = cmd.to_spec()?;
    check_sources(app, ctx, &cmd).await?;
    let root = &cmd.root_volume;
    let provisioning = provisioning(root.provisioning);
    let root_source = match &root.image_path {
        Some(image) => Source::Image { image: image.clone(), size: root.size, provisioning },
        None => Source::Empty { size: root.size.unwrap_or(0), provisioning },
    };
    let sources: Vec<Source> = std::iter::once(root_source)
        .chain(
            cmd.data_volumes
                .iter()
                .map(|d| Source::Empty { size: d.size, provisioning: self::provisioning(d.provisioning) }),
        )
        .collect();
    let new = NewVm { spec: &spec, sources: &sources, tpm_from: None, nvram_from: None, strategy: cmd.strategy };
    assemble::create_vm(app, ctx, new).await
}

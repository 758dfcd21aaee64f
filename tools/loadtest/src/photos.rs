//! The photos a load is made of: a folder's files, or distinct noise JPEGs made with libvips.

use std::path::Path;

use anyhow::Context;

/// The files directly inside `dir`, sorted.
pub fn photo_files(dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("failed to read {}", dir.display()))?
    {
        let path = entry?.path();
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// `count` distinct noise JPEGs of `size` (`WIDTHxHEIGHT`) in `dir`, made with libvips.
pub fn make_photos(
    dir: &Path,
    count: usize,
    size: &str,
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    use rs_vips::voption::{Setter, VOption};
    let (width, height) = size
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse::<i32>().ok()?, h.parse::<i32>().ok()?)))
        .filter(|&(w, h)| w > 0 && h > 0)
        .with_context(|| format!("--size takes WIDTHxHEIGHT, not {size:?}"))?;
    conveyor_processor::render::init()?;
    std::fs::create_dir_all(dir)?;
    let progress = indicatif::ProgressBar::new(count as u64).with_message("making photos");
    let mut files = Vec::with_capacity(count);
    for i in 0..count {
        let noise = rs_vips::VipsImage::gaussnoise_with_opts(
            width,
            height,
            VOption::new().set("mean", 128.0).set("sigma", 40.0),
        )?;
        let photo = rs_vips::VipsImage::bandjoin(&[
            noise.linear(&[1.0], &[-20.0])?,
            noise.linear(&[0.8], &[10.0])?,
            noise.linear(&[0.6], &[30.0])?,
        ])?
        .cast(rs_vips::enums::BandFormat::Uchar)?;
        let path = dir.join(format!("photo-{i:04}.jpg"));
        std::fs::write(
            &path,
            photo.jpegsave_buffer_with_opts(VOption::new().set("Q", 85))?,
        )?;
        files.push(path);
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok(files)
}

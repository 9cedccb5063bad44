//! Writes a demo data directory: `cargo run --release -p kiln-demo --example generate -- OUT_DIR [SEED] [tiny|small|full]`.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let out_dir = PathBuf::from(args.next().unwrap_or_else(|| "demo_data".into()));
    let seed = args.next().map_or(Ok(1337), |s| s.parse())?;
    let size = args
        .next()
        .map_or(Ok(kiln_demo::Size::Small), |s| s.parse())?;
    let manifest = kiln_demo::generate(&out_dir, seed, size)?;
    println!("{}", serde_json::to_string_pretty(&manifest.counts)?);
    Ok(())
}

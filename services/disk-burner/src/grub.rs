//! The image selector: the master GRUB menu, the operator's interface on every drive.
//!
//! The master config (on the ESP) lists every image on the drive, newest burn first unless a
//! default is set, and chainloads each image's own config from its partition, handing it the
//! partition UUIDs of its root and of its overlay. The image's config (written by the image
//! builder) boots its kernel with `overlayroot=crypt:dev=/dev/disk/by-partuuid/<overlay>,...`:
//! a random key every boot, so each boot starts clean and no state drifts between missions.

use crate::gpt::Gpt;
use crate::layout;

/// The slots that hold an image, the most recently burned first.
fn filled_newest_first(gpt: &Gpt) -> Vec<layout::Slot> {
    let mut slots: Vec<_> = layout::slots(gpt)
        .into_iter()
        .filter(|s| s.image.is_some())
        .collect();
    slots.sort_by_key(|s| std::cmp::Reverse(s.partition.attributes >> 48));
    slots
}

/// The slot the menu boots by default: the one holding `default` (an image id) when the drive
/// holds it, else the most recently burned.
pub fn boots_by_default(gpt: &Gpt, default: Option<&str>) -> Option<usize> {
    let slots = filled_newest_first(gpt);
    default
        .and_then(|d| slots.iter().find(|s| s.image.as_deref() == Some(d)))
        .or(slots.first())
        .map(|s| s.number)
}

/// The master `grub.cfg` for a drive's table. `default` is an image id; `None` boots the most
/// recently burned image.
pub fn master_config(gpt: &Gpt, default: Option<&str>) -> String {
    let slots = filled_newest_first(gpt);
    let default_entry = boots_by_default(gpt, default)
        .map(|n| format!("slot-{n}"))
        .unwrap_or_default();
    let mut cfg = format!(
        "# Motorpool master boot menu for drive {disk}. Written by the disk burner; change the\n\
         # default with `motorpool drives set-default`.\n\
         set timeout=10\n\
         set default=\"{default_entry}\"\n\
         insmod part_gpt\n\
         insmod ext2\n\
         insmod regexp\n\
         insmod test\n\
         regexp --set=1:mp_disk '^\\(?([^,)]+),' \"$root\"\n",
        disk = gpt.disk_guid,
    );
    if slots.is_empty() {
        cfg.push_str("menuentry \"No image on this drive\" { halt }\n");
    }
    // Before the menu, GRUB looks into every image partition and says what it found: the proof
    // that the menu's entries are there to boot (the boot test reads these lines).
    for s in &slots {
        let (n, part, image) = (
            s.number,
            s.index + 1,
            s.image.as_deref().unwrap_or_default(),
        );
        cfg.push_str(&format!(
            "if [ -e ($mp_disk,gpt{part})/boot/grub/grub.cfg ]; then echo \"motorpool: slot {n} image {image} found, bootable\"\n\
             elif [ -d ($mp_disk,gpt{part})/ ]; then echo \"motorpool: slot {n} image {image} found, no boot config\"\n\
             else echo \"motorpool: slot {n} image {image} MISSING\"; fi\n"
        ));
    }
    for s in &slots {
        let image = s.image.as_deref().unwrap_or_default();
        let overlay = s
            .overlay
            .as_ref()
            .map(|o| o.unique_guid.to_string())
            .unwrap_or_default();
        cfg.push_str(&format!(
            "menuentry \"Motorpool image {image} (slot {n})\" --id slot-{n} {{\n\
             \x20   set mp_image=\"{image}\"\n\
             \x20   set mp_root_partuuid=\"{root}\"\n\
             \x20   set mp_overlay_partuuid=\"{overlay}\"\n\
             \x20   export mp_image mp_root_partuuid mp_overlay_partuuid\n\
             \x20   set root=\"($mp_disk,gpt{part})\"\n\
             \x20   configfile /boot/grub/grub.cfg\n\
             }}\n",
            n = s.number,
            root = s.partition.unique_guid,
            part = s.index + 1,
        ));
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpt::Guid;
    use crate::layout::{LayoutOptions, plan};

    #[test]
    fn the_menu_lists_every_image_and_honours_the_default() {
        let disk = Guid::parse("00000000-ab12-4000-8000-000000000001").unwrap();
        let mut gpt = plan(disk, (4u64 << 30) / 512, &LayoutOptions::default()).unwrap();
        assert!(master_config(&gpt, None).contains("No image on this drive"));
        for (slot, (name, seq)) in [(1, ("v1", 1u64)), (3, ("v3", 3)), (2, ("v2", 2))] {
            let i = slot;
            gpt.partitions[i].name = format!("mp:{name}");
            gpt.partitions[i].attributes = seq << 48;
        }
        let cfg = master_config(&gpt, None);
        for v in ["v1", "v2", "v3"] {
            assert!(cfg.contains(&format!("Motorpool image {v} ")), "{cfg}");
        }
        assert!(
            cfg.contains("set default=\"slot-3\""),
            "newest burn by default:\n{cfg}"
        );
        assert!(cfg.find("image v3").unwrap() < cfg.find("image v1").unwrap());
        assert!(
            cfg.contains("set mp_overlay_partuuid=\"55555555-ab12-4000-8000-555555555555\""),
            "{cfg}"
        );
        assert!(
            cfg.contains("gpt3)"),
            "slot 2's image is partition 3:\n{cfg}"
        );
        let cfg = master_config(&gpt, Some("v1"));
        assert!(cfg.contains("set default=\"slot-1\""), "{cfg}");
        assert!(master_config(&gpt, Some("nope")).contains("set default=\"slot-3\""));
    }
}

//! The Motorpool drive layout (after Flexo) and the safety interlock.
//!
//! ```text
//! GPT, disk GUID 00000000-xxxx-...        <- only such drives are ever written
//!   1   ESP        type EFI System          partuuid eeeeeeee-0000-<disk>-...   master GRUB
//!   2   image 1    type 11111111-6d70-...   partuuid 11111111-0001-<disk>-...   one image version
//!   3   overlay 1  type 55555555-6d70-...   partuuid 55555555-0001-<disk>-...   its writable layer
//!   4   image 2    ...                                                       (up to 12 pairs)
//! ```
//!
//! The first field of a partition's type and unique GUIDs says what it is (`eeeeeeee` ESP,
//! `11111111` image, `55555555` overlay), the second its slot, the third the disk's own id (the
//! disk GUID's second field), so `/dev/disk/by-partuuid/55555555-0003-...` names slot 3's
//! overlay on that drive and nothing else. An image partition's GPT name is `mp:<image id>` once
//! an image is burned and verified into it, `mp:empty` before.

use crate::gpt::{FIRST_USABLE, Gpt, Guid, Partition, SECTOR};

pub const MAX_IMAGES: usize = 12;
/// Type GUID of image partitions.
pub const IMAGE_TYPE: Guid = Guid([
    0x11, 0x11, 0x11, 0x11, 0x6d, 0x70, 0x49, 0x4d, 0x80, 0x00, 0x6d, 0x6f, 0x74, 0x6f, 0x72, 0x70,
]);
/// Type GUID of overlay partitions.
pub const OVERLAY_TYPE: Guid = Guid([
    0x55, 0x55, 0x55, 0x55, 0x6d, 0x70, 0x4f, 0x56, 0x80, 0x00, 0x6d, 0x6f, 0x74, 0x6f, 0x72, 0x70,
]);
pub const EMPTY_NAME: &str = "mp:empty";
const ALIGN: u64 = 2048; // 1 MiB in sectors

/// What a partition is, from its GUID prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Esp,
    Image(usize),
    Overlay(usize),
}

/// True for a drive marked as Motorpool's: its disk GUID starts with `00000000`.
pub fn is_motorpool(gpt: &Gpt) -> bool {
    gpt.disk_guid.0[..4] == [0, 0, 0, 0]
}

fn unique(prefix: [u8; 4], slot: u16, disk: &Guid) -> Guid {
    let mut g = Guid::random();
    g.0[..4].copy_from_slice(&prefix);
    g.0[4..6].copy_from_slice(&slot.to_be_bytes());
    g.0[6..8].copy_from_slice(&disk.0[4..6]);
    g
}

/// The kind of a partition by its unique GUID's prefix.
pub fn kind(p: &Partition) -> Option<Kind> {
    let slot = u16::from_be_bytes([p.unique_guid.0[4], p.unique_guid.0[5]]) as usize;
    match p.unique_guid.0[..4] {
        [0xee, 0xee, 0xee, 0xee] if p.type_guid == Guid::ESP => Some(Kind::Esp),
        [0x11, 0x11, 0x11, 0x11]
            if p.type_guid == IMAGE_TYPE && (1..=MAX_IMAGES).contains(&slot) =>
        {
            Some(Kind::Image(slot))
        }
        [0x55, 0x55, 0x55, 0x55]
            if p.type_guid == OVERLAY_TYPE && (1..=MAX_IMAGES).contains(&slot) =>
        {
            Some(Kind::Overlay(slot))
        }
        _ => None,
    }
}

/// How to lay a drive out.
#[derive(Clone, Debug)]
pub struct LayoutOptions {
    pub esp_bytes: u64,
    /// Image slots (at most 12).
    pub slots: usize,
    /// Share of each slot's space given to its overlay, in percent.
    pub overlay_percent: u64,
    /// Write the ESP (GRUB and the master menu) after each burn. Default true.
    pub boot_menu: bool,
}

impl Default for LayoutOptions {
    fn default() -> Self {
        LayoutOptions {
            esp_bytes: 300 << 20,
            slots: MAX_IMAGES,
            overlay_percent: 20,
            boot_menu: true,
        }
    }
}

fn align_up(lba: u64) -> u64 {
    lba.div_ceil(ALIGN) * ALIGN
}

/// A fresh Motorpool table for a drive of `sectors` with disk GUID `disk` (which must be marked).
pub fn plan(disk: Guid, sectors: u64, opts: &LayoutOptions) -> Result<Gpt, String> {
    if disk.0[..4] != [0, 0, 0, 0] {
        return Err(format!(
            "disk GUID {disk} is not a Motorpool drive's (00000000-...)"
        ));
    }
    let slots = opts.slots.clamp(1, MAX_IMAGES);
    let mut gpt = Gpt {
        disk_guid: disk,
        sectors,
        partitions: Vec::new(),
    };
    let last = gpt.last_usable();
    let esp_first = align_up(FIRST_USABLE);
    let esp_last = esp_first + opts.esp_bytes.div_ceil(SECTOR) - 1;
    let start = align_up(esp_last + 1);
    if start >= last {
        return Err(format!(
            "{} bytes is too small for the ESP",
            sectors * SECTOR
        ));
    }
    let per_slot = ((last + 1 - start) / slots as u64) / ALIGN * ALIGN;
    let overlay = (per_slot * opts.overlay_percent / 100) / ALIGN * ALIGN;
    let image = per_slot - overlay;
    if image < ALIGN || overlay < ALIGN {
        return Err(format!(
            "{} bytes is too small for {slots} image slots",
            sectors * SECTOR
        ));
    }
    gpt.partitions.push(Partition {
        type_guid: Guid::ESP,
        unique_guid: unique([0xee; 4], 0, &disk),
        first_lba: esp_first,
        last_lba: esp_last,
        attributes: 0,
        name: "mp:esp".into(),
    });
    for s in 0..slots {
        let first = start + s as u64 * per_slot;
        gpt.partitions.push(Partition {
            type_guid: IMAGE_TYPE,
            unique_guid: unique([0x11; 4], s as u16 + 1, &disk),
            first_lba: first,
            last_lba: first + image - 1,
            attributes: 0,
            name: EMPTY_NAME.into(),
        });
        gpt.partitions.push(Partition {
            type_guid: OVERLAY_TYPE,
            unique_guid: unique([0x55; 4], s as u16 + 1, &disk),
            first_lba: first + image,
            last_lba: first + per_slot - 1,
            attributes: 0,
            name: format!("mp:overlay-{}", s + 1),
        });
    }
    Ok(gpt)
}

/// An image slot as the table describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    pub number: usize,
    /// Index in the table's partitions (partition number - 1).
    pub index: usize,
    pub image: Option<String>,
    pub partition: Partition,
    pub overlay: Option<Partition>,
}

/// The image slots of a Motorpool table, by slot number.
pub fn slots(gpt: &Gpt) -> Vec<Slot> {
    let mut out: Vec<Slot> = gpt
        .partitions
        .iter()
        .enumerate()
        .filter_map(|(i, p)| match kind(p) {
            Some(Kind::Image(n)) => Some(Slot {
                number: n,
                index: i,
                image: p
                    .name
                    .strip_prefix("mp:")
                    .filter(|n| *n != "empty")
                    .map(str::to_string),
                partition: p.clone(),
                overlay: gpt
                    .partitions
                    .iter()
                    .find(|o| kind(o) == Some(Kind::Overlay(n)))
                    .cloned(),
            }),
            _ => None,
        })
        .collect();
    out.sort_by_key(|s| s.number);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_has_an_esp_and_twelve_image_overlay_pairs_that_say_what_they_are() {
        let disk = Guid::parse("00000000-ab12-4000-8000-000000000001").unwrap();
        let sectors = (8u64 << 30) / SECTOR;
        let gpt = plan(disk, sectors, &LayoutOptions::default()).unwrap();
        assert_eq!(gpt.partitions.len(), 1 + 2 * MAX_IMAGES);
        assert_eq!(kind(&gpt.partitions[0]), Some(Kind::Esp));
        let s = slots(&gpt);
        assert_eq!(s.len(), 12);
        for (i, slot) in s.iter().enumerate() {
            assert_eq!(slot.number, i + 1);
            assert_eq!(slot.image, None);
            assert_eq!(slot.partition.first_lba % ALIGN, 0);
            let id = slot.partition.unique_guid.to_string();
            assert!(
                id.starts_with(&format!("11111111-{:04x}-ab12-", i + 1)),
                "{id}"
            );
            let ov = slot.overlay.as_ref().unwrap().unique_guid.to_string();
            assert!(
                ov.starts_with(&format!("55555555-{:04x}-ab12-", i + 1)),
                "{ov}"
            );
        }
        // Writes and reads back as a valid table (a sparse file stands in for the drive).
        let mut file = tempfile::tempfile().unwrap();
        file.set_len(sectors * SECTOR).unwrap();
        gpt.write(&mut file).unwrap();
        assert_eq!(Gpt::read(&mut file, sectors).unwrap(), gpt);
    }

    #[test]
    fn unmarked_drives_are_never_planned() {
        let disk = Guid::parse("12345678-ab12-4000-8000-000000000001").unwrap();
        assert!(
            plan(disk, 1 << 24, &LayoutOptions::default())
                .unwrap_err()
                .contains("not a Motorpool drive")
        );
        assert!(
            plan(
                Guid::parse("00000000-0000-4000-8000-000000000001").unwrap(),
                4096,
                &LayoutOptions::default()
            )
            .is_err()
        );
    }
}

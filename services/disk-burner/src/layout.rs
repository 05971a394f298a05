//! The Motorpool drive layout (after Flexo) and the safety interlock.
//!
//! ```text
//! GPT, disk GUID 00000000-<DISK_ID>-xxxxxxxxxxxx     <- only such drives are ever written
//!   1    ESP       type EFI System          partuuid eeeeeeee-0000-<disk>-...    master GRUB
//!   2    image 1   type 11111111-6d70-...   partuuid 11111111-0001-<disk>-...    one image version
//!   3    image 2   ...                                                     (1 to 12 image slots)
//!   N+2  overlay   type 55555555-6d70-...   partuuid 55555555-<DISK_ID>-555555555555
//! ```
//!
//! The first field of a partition's type and unique GUIDs says what it is (`eeeeeeee` ESP,
//! `11111111` image, `55555555` overlay). An image's second field is its slot, the third the
//! disk's own 16 bits (the disk GUID's second field). The overlay follows the seed's (Flexo's)
//! scheme: one per drive, `55555555-<DISK_ID>-555555555555` where `DISK_ID` is the disk GUID's
//! middle three fields, so `overlayroot=crypt:dev=/dev/disk/by-partuuid/55555555-<DISK_ID>-...`
//! names that drive's overlay and nothing else. One overlay serves every image: only one image
//! runs at a time, and `overlayroot=crypt` with a random key starts it empty at every boot. Its
//! share of the drive is [`LayoutOptions::overlay_percent`]; the slot count is
//! [`LayoutOptions::slots`], both per drive size through [`LayoutOptions::by_size`]. Drives laid
//! out before this scheme (an overlay per slot, `55555555-<slot>-<disk>-...`) are still read.
//!
//! An image partition's GPT name is `mp:<image id>` once an image is burned and verified into
//! it and the ESP's menu lists it, `mp:empty` before.

use crate::gpt::{FIRST_USABLE, Gpt, Guid, Partition, SECTOR};
pub use motorpool_config::DriveLayout;

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
    /// The drive's overlay (slot 0), or, on drives laid out before the seed's scheme, one slot's.
    Overlay(usize),
}

/// The seed's partuuid of a drive's overlay: `55555555-<DISK_ID>-555555555555`.
pub fn overlay_guid(disk: &Guid) -> Guid {
    let mut g = Guid([0x55; 16]);
    g.0[4..10].copy_from_slice(&disk.0[4..10]);
    g
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
        [0x55, 0x55, 0x55, 0x55]
            if p.type_guid == OVERLAY_TYPE && p.unique_guid.0[10..] == [0x55; 6] =>
        {
            Some(Kind::Overlay(0))
        }
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
    /// Image slots (1 to 12).
    pub slots: usize,
    /// Share of the drive (after the ESP) given to its overlay, in percent (1 to 90).
    pub overlay_percent: u64,
    /// Slots and overlay share by drive size: the entry with the largest `min_drive_gib` that
    /// the drive reaches wins over `slots` and `overlay_percent`.
    pub by_size: Vec<DriveLayout>,
    /// Write the ESP (GRUB and the master menu) after each burn. Default true.
    pub boot_menu: bool,
}

impl Default for LayoutOptions {
    fn default() -> Self {
        LayoutOptions {
            esp_bytes: 300 << 20,
            slots: MAX_IMAGES,
            overlay_percent: 20,
            by_size: Vec::new(),
            boot_menu: true,
        }
    }
}

impl LayoutOptions {
    /// `(slots, overlay percent)` for a drive of `bytes`.
    pub fn for_drive(&self, bytes: u64) -> (usize, u64) {
        self.by_size
            .iter()
            .filter(|l| bytes >= l.min_drive_gib << 30)
            .max_by_key(|l| l.min_drive_gib)
            .map_or((self.slots, self.overlay_percent), |l| {
                (l.slots, l.overlay_percent)
            })
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
    let (slots, overlay_percent) = opts.for_drive(sectors * SECTOR);
    let slots = slots.clamp(1, MAX_IMAGES);
    let overlay_percent = overlay_percent.clamp(1, 90);
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
    let room = last + 1 - start;
    let overlay = (room * overlay_percent / 100) / ALIGN * ALIGN;
    let image = ((room - overlay) / slots as u64) / ALIGN * ALIGN;
    if image < ALIGN || overlay < ALIGN {
        return Err(format!(
            "{} bytes is too small for {slots} image slots and an overlay",
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
        let first = start + s as u64 * image;
        gpt.partitions.push(Partition {
            type_guid: IMAGE_TYPE,
            unique_guid: unique([0x11; 4], s as u16 + 1, &disk),
            first_lba: first,
            last_lba: first + image - 1,
            attributes: 0,
            name: EMPTY_NAME.into(),
        });
    }
    let first = start + slots as u64 * image;
    gpt.partitions.push(Partition {
        type_guid: OVERLAY_TYPE,
        unique_guid: overlay_guid(&disk),
        first_lba: first,
        last_lba: last,
        attributes: 0,
        name: "mp:overlay".into(),
    });
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
                overlay: [n, 0].into_iter().find_map(|k| {
                    gpt.partitions
                        .iter()
                        .find(|o| kind(o) == Some(Kind::Overlay(k)))
                        .cloned()
                }),
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
    fn a_plan_has_an_esp_image_slots_and_the_seeds_overlay_that_say_what_they_are() {
        let disk = Guid::parse("00000000-ab12-4cd3-8e45-000000000001").unwrap();
        let sectors = (8u64 << 30) / SECTOR;
        let gpt = plan(disk, sectors, &LayoutOptions::default()).unwrap();
        assert_eq!(gpt.partitions.len(), 1 + MAX_IMAGES + 1);
        assert_eq!(kind(&gpt.partitions[0]), Some(Kind::Esp));
        let overlay = gpt.partitions.last().unwrap();
        assert_eq!(kind(overlay), Some(Kind::Overlay(0)));
        // The seed's scheme: 55555555-<DISK_ID>-555555555555.
        assert_eq!(
            overlay.unique_guid.to_string(),
            "55555555-ab12-4cd3-8e45-555555555555"
        );
        // About a fifth of the drive, and the partitions tile it without overlapping.
        let share = overlay.len() as f64 / (sectors * SECTOR) as f64;
        assert!((0.18..0.21).contains(&share), "{share}");
        for w in gpt.partitions.windows(2) {
            assert!(w[0].last_lba < w[1].first_lba, "{:?}", w);
        }
        let s = slots(&gpt);
        assert_eq!(s.len(), 12);
        for (i, slot) in s.iter().enumerate() {
            assert_eq!(slot.number, i + 1);
            assert_eq!(slot.index, i + 1);
            assert_eq!(slot.image, None);
            assert_eq!(slot.partition.first_lba % ALIGN, 0);
            let id = slot.partition.unique_guid.to_string();
            assert!(
                id.starts_with(&format!("11111111-{:04x}-ab12-", i + 1)),
                "{id}"
            );
            assert_eq!(slot.overlay.as_ref(), Some(overlay));
        }
        // Writes and reads back as a valid table (a sparse file stands in for the drive).
        let mut file = tempfile::tempfile().unwrap();
        file.set_len(sectors * SECTOR).unwrap();
        gpt.write(&mut file).unwrap();
        assert_eq!(Gpt::read(&mut file, sectors).unwrap(), gpt);
    }

    #[test]
    fn slots_and_overlay_share_follow_the_drive_size() {
        let disk = Guid::parse("00000000-ab12-4000-8000-000000000001").unwrap();
        let opts = LayoutOptions {
            by_size: vec![
                DriveLayout {
                    min_drive_gib: 500,
                    slots: 4,
                    overlay_percent: 5,
                },
                DriveLayout {
                    min_drive_gib: 2000,
                    slots: 8,
                    overlay_percent: 5,
                },
            ],
            ..Default::default()
        };
        let tib = (1u64 << 40) / SECTOR;
        let gpt = plan(disk, tib, &opts).unwrap();
        let s = slots(&gpt);
        assert_eq!(s.len(), 4);
        // A 100 GB image fits a slot of a 1 TiB drive with 4 slots.
        assert!(s[0].partition.len() > 200 << 30, "{}", s[0].partition.len());
        assert_eq!(slots(&plan(disk, 4 * tib, &opts).unwrap()).len(), 8);
        assert_eq!(slots(&plan(disk, tib / 4, &opts).unwrap()).len(), 12);
    }

    #[test]
    fn drives_laid_out_with_an_overlay_per_slot_are_still_read() {
        let disk = Guid::parse("00000000-ab12-4000-8000-000000000001").unwrap();
        let mut gpt = plan(disk, (4u64 << 30) / SECTOR, &LayoutOptions::default()).unwrap();
        // The older scheme: slot 1's own overlay, 55555555-0001-<disk>-<random>.
        let mut own = Guid::random();
        own.0[..4].copy_from_slice(&[0x55; 4]);
        own.0[4..6].copy_from_slice(&1u16.to_be_bytes());
        own.0[6..8].copy_from_slice(&disk.0[4..6]);
        let mut p = gpt.partitions.last().unwrap().clone();
        p.unique_guid = own;
        gpt.partitions.push(p);
        let s = slots(&gpt);
        assert_eq!(s[0].overlay.as_ref().unwrap().unique_guid, own);
        assert_eq!(
            s[1].overlay.as_ref().unwrap().unique_guid,
            overlay_guid(&disk)
        );
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

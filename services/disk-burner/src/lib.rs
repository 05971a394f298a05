//! Fleet image deployment, after Lyft's Flexo: drives that boot exactly the same tested software.
//!
//! Layout:
//! - [`gpt`]: GUID partition tables, read and written here (no partitioning tool).
//! - [`layout`]: the Motorpool drive layout (ESP, 1 to 12 image slots and the drive's overlay,
//!   whose GUID prefixes say what they are) and the safety interlock (disk GUID `00000000-...`).
//! - [`image`]: an image's manifest (size, BLAKE3, block map of the ranges holding data), checked
//!   against the image file (and its signature, [`sign`]) before a burn; the bytes are read from
//!   the file as drives are written, never held whole.
//! - [`sign`]: ed25519 signatures over image manifests.
//! - [`burn`]: burning onto many drives at once, sparse-aware, with read-back verification past
//!   the page cache; per-drive states.
//! - [`source`]: where drives come from: a bays directory, or the host's block devices with
//!   netlink uevents for hot-plug; disks in use or read-only are refused there.
//! - [`leds`]: drive states on the chassis LEDs through ledmon's `ledctl`.
//! - [`grub`]: the master GRUB menu, the image selector; [`esp`]: the ESP's FAT file system with
//!   GRUB and the menu, written in place; [`boot`]: the qemu + OVMF boot test.
//! - [`actor`]: the burner as a bus actor: watches for drives, burns the channel's newest images
//!   onto every drive that appears, publishes each drive's state.

pub mod actor;
pub mod boot;
pub mod burn;
pub mod depot;
pub mod esp;
pub mod gpt;
pub mod grub;
pub mod image;
pub mod layout;
pub mod leds;
pub mod metric_names;
pub mod sign;
pub mod source;

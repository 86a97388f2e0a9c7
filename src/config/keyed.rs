//! Settings structs that know their own file keys.
//!
//! Every field of a settings struct is declared once, together with the file key(s) it comes
//! from, inside `keyed_struct!`. Which struct a field sits in decides how a reload treats it
//! (the restart-only part or the live part of [`super::Config`]), so a key cannot be added
//! without being classified, and the reload diff follows from the types instead of a list kept
//! by hand. A unit test checks that every key of the file mirror appears in exactly one class.

/// A settings struct whose fields map to file keys.
pub trait Keyed {
    /// Every file key this struct's fields come from.
    fn keys(out: &mut Vec<&'static str>);
    /// The file key of every field that differs between `self` and `other`.
    fn changed(&self, other: &Self, out: &mut Vec<&'static str>);
    /// Each field's first file key and its value as `Debug` shows it (`check --keys`).
    fn values(&self, out: &mut Vec<(&'static str, String)>);

    /// [`Keyed::changed`] as a fresh list.
    fn diff(&self, other: &Self) -> Vec<&'static str> {
        let mut out = Vec::new();
        self.changed(other, &mut out);
        out
    }

    /// [`Keyed::keys`] as a fresh list.
    fn all_keys() -> Vec<&'static str> {
        let mut out = Vec::new();
        Self::keys(&mut out);
        out
    }
}

/// Declares a settings struct with `field: Type => "file.key"` (or `"a" | "b"` when a field is
/// derived from several keys; the first is the one reported as changed).
macro_rules! keyed_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $(#[$fmeta:meta])*
                pub $field:ident : $ty:ty => $key:literal $(| $more:literal)*
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl $crate::config::keyed::Keyed for $name {
            fn keys(out: &mut Vec<&'static str>) {
                $( out.push($key); $( out.push($more); )* )*
            }
            fn changed(&self, other: &Self, out: &mut Vec<&'static str>) {
                $( if self.$field != other.$field { out.push($key); } )*
            }
            fn values(&self, out: &mut Vec<(&'static str, String)>) {
                $( out.push(($key, format!("{:?}", self.$field))); )*
            }
        }
    };
}

/// Declares a struct of [`Keyed`] sections; its keys and changes are its sections'.
macro_rules! keyed_sections {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl $crate::config::keyed::Keyed for $name {
            fn keys(out: &mut Vec<&'static str>) {
                $( <$ty as $crate::config::keyed::Keyed>::keys(out); )*
            }
            fn changed(&self, other: &Self, out: &mut Vec<&'static str>) {
                $( self.$field.changed(&other.$field, out); )*
            }
            fn values(&self, out: &mut Vec<(&'static str, String)>) {
                $( self.$field.values(out); )*
            }
        }
    };
}

pub(crate) use {keyed_sections, keyed_struct};

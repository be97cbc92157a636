// Package format reads and writes uffdrestore snapshot files (format v1).
//
// A snapshot is one file built for random access by chunk:
//
//	┌────────────┬──────────────────────────┬──────────────────────┬────────────┐
//	│ header 32B │ chunk data (stored bytes │ index: regions,      │ footer 32B │
//	│ magic, ver │ of non-zero chunks, in   │ chunk table, meta-   │ index off/ │
//	│ len, flags │ chunk or any other order)│ data, profiles; CRC  │ len/CRC    │
//	└────────────┴──────────────────────────┴──────────────────────┴────────────┘
//
// The Writer streams (index last) and compresses chunks in parallel with
// byte-identical output for any worker count. The Reader validates every
// field of the header, footer and index before use; a Decoder decompresses
// one chunk at a time straight into the caller's buffer, without allocating,
// and verifies CRC-32C checksums of the stored and the decoded bytes.
// Rewrite copies a snapshot with its chunk data in another order (a working
// set first), verbatim; AppendProfile and SetProfiles edit the profiles in
// place.
//
// The byte layout, limits and versioning rules are in SPEC.md.
package format

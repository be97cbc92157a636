/*
 * ur_client.h - the C client of the uffdrestore attach protocol (v2).
 *
 * A target process links this (bin/libuffdrestore.a or .so) to map a
 * snapshot that `uffdrestore load SNAP --socket PATH` serves:
 *
 *	struct ur_session *s;
 *	int rc = ur_attach("/run/snap.sock", NULL, &s);
 *	if (rc < 0) {
 *		fprintf(stderr, "attach: %s\n", ur_session_error(NULL));
 *		return 1;
 *	}
 *	const struct ur_region *r = ur_session_find(s, "heap"); // NULL unless exactly one
 *	... read r->addr[0 .. r->length) : pages fill on first touch ...
 *	ur_detach(s);
 *
 * ur_attach connects, checks that the server runs as root, as this
 * process's uid or as opts->server_uid (SO_PEERCRED; UR_EUNTRUSTED
 * otherwise, before anything is mapped or sent), receives the hello, the
 * backing file and the regions that follow it, maps every region (in hello order), creates a
 * userfaultfd, registers the mappings (MISSING|MINOR), sends them with the
 * userfaultfd and waits for "ready".
 *
 * Any user can attach: without root, CAP_SYS_PTRACE, access to
 * /dev/userfaultfd or vm.unprivileged_userfaultfd=1 the userfaultfd is
 * UFFD_USER_MODE_ONLY (UR_UFFD_USER_MODE_ONLY below: a read(2) into or
 * write(2) from an unfilled page fails with EFAULT; copy through a buffer).
 * Fork events need CAP_SYS_PTRACE; without them (UR_UFFD_NO_FORK_EVENTS) the
 * regions are MADV_DONTFORK: a forked child has no mapping there (a touch
 * raises SIGSEGV), because the kernel would leave the child an unserved
 * mapping that reads zeros where the server has not filled yet. See
 * PROTOCOL.md section 4.
 *
 * Regions are identified by their index (0 .. ur_session_nregions-1, in
 * snapshot order): names need not be unique (a snapshot of a process has
 * many "anon" regions and a library mapped several times under one path).
 * The session keeps its own copy of the userfaultfd: if the server dies,
 * a thread touching a page that was never filled waits (it never reads
 * zeros); see PROTOCOL.md for what an operator does then.
 *
 * Every function returning int returns >= 0 on success, -errno for a
 * system error, or one of the UR_E* protocol codes below (all < -4095, so
 * they never collide with an errno). ur_strerror names a code; the detailed
 * message (which field, what the server said) is ur_session_error(s), or
 * ur_session_error(NULL) for the calling thread's last ur_attach.
 *
 * A session is not thread-safe: call ur_stats/ur_poll/ur_detach from one
 * thread at a time. Any thread may touch the mapped regions.
 *
 * Standalone: needs only libc and the kernel uapi headers.
 */
#ifndef UR_CLIENT_H
#define UR_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define UR_PROTOCOL_VERSION 2
#define UR_MAX_MSG (64 * 1024) /* bytes in one message, either way */
#define UR_MAX_REGIONS 65536 /* regions a hello may announce (they come in batches) */

/* Protocol error codes. */
#define UR_EMALFORMED (-10001) /* the server sent something this client cannot parse */
#define UR_ETOOLARGE (-10002) /* a message larger than UR_MAX_MSG, or with too many fds */
#define UR_EREFUSED (-10003) /* the server answered {"type":"error"}; see ur_session_error */
#define UR_EVERSION (-10004) /* the server speaks another protocol version */
#define UR_ECLOSED (-10005) /* the server closed the connection */
#define UR_ENOFEATURE (-10006) /* the kernel lacks minor faults for this backing */
#define UR_EADDR (-10007) /* at_original_addr: no or misaligned original address */
#define UR_ETIMEDOUT (-10008) /* the server did not answer within timeout_ms */
#define UR_EUNTRUSTED (-10009) /* the server runs as a uid this client does not trust */
#define UR_ESNAPSHOT (-10010) /* re-attaching: the restarted server serves another snapshot or layout */
#define UR_ENOREGION (-10011) /* ur_attach_mapping: no region of that index, or an empty one */
#define UR_EMAPRANGE (-10012) /* ur_attach_mapping: the range is not page aligned or not inside its region */
#define UR_ENOTBACKING (-10013) /* ur_attach_mapping: the range is not (all) a mapping of the session's
				   backing fd at the region's offset, or not with the flags given */

struct ur_attach_opts {
	int private_mapping; /* MAP_PRIVATE: writes are copy-on-write, private to this process */
	int at_original_addr; /* map each region at its original address (MAP_FIXED_NOREPLACE);
				 with a hugetlb backing that address must be 2 MiB aligned */
	int readonly; /* PROT_READ only (default PROT_READ|PROT_WRITE) */
	int no_fork_events; /* do not ask for UFFD_FEATURE_EVENT_FORK (asked for only with
			       CAP_SYS_PTRACE anyway). Without fork events the regions are
			       MADV_DONTFORK: a forked child has no mapping of them, so a
			       touch there raises SIGSEGV (it would otherwise read zeros
			       where the server has not filled yet); fork+exec is fine */
	int timeout_ms; /* bound on each handshake step; 0 = 10000, < 0 = none */
	uint32_t server_uid; /* one more uid the server may run as. Before mapping anything
				or sending its userfaultfd, ur_attach checks the server's uid
				(SO_PEERCRED): root, this process's effective uid, or this one
				(0 adds nothing); otherwise UR_EUNTRUSTED. */
	int reattach_timeout_ms; /* when the server dies (the socket closes), ur_poll connects to the
				    same path again and re-attaches this session to the restarted
				    server (`uffdrestore load --adopt`), retrying (10 ms back-off
				    doubling to 500 ms) for this long: 0 = 30000, < 0 = never (ur_poll
				    then returns UR_ECLOSED at once). Faults raised meanwhile wait in
				    the userfaultfd and are served by the new server. The session
				    keeps the backing fd open for that (PROTOCOL.md section 5.1). */
};

struct ur_region {
	const char *name;
	unsigned char *addr; /* where it is mapped */
	uint64_t size; /* bytes mapped: length rounded up to the page size */
	uint64_t length; /* the region's bytes in the snapshot */
	uint64_t offset; /* offset in the backing file */
	uint64_t orig_addr; /* the address it had when snapshotted, 0 if unknown */
	uint32_t prot; /* PROT_* it had when snapshotted */
};

struct ur_session;

int ur_attach(const char *socket_path, const struct ur_attach_opts *opts, struct ur_session **out);

size_t ur_session_nregions(const struct ur_session *s);
const struct ur_region *ur_session_region(const struct ur_session *s, size_t i);
/* The one region named name; NULL when no region or more than one has that
 * name (use ur_session_find_next for those). */
const struct ur_region *ur_session_find(const struct ur_session *s, const char *name);
/* The index of the first region named name at index >= from, or
 * ur_session_nregions(s) if there is none: iterate every region of a name
 * with for (i = ur_session_find_next(s, n, 0); i < nr; i = ur_session_find_next(s, n, i + 1)). */
size_t ur_session_find_next(const struct ur_session *s, const char *name, size_t from);
const char *ur_session_snapshot(const struct ur_session *s);
const char *ur_session_backing(const struct ur_session *s); /* "hugetlb" or "shmem" */
uint64_t ur_session_page_size(const struct ur_session *s);
uint64_t ur_session_chunk_size(const struct ur_session *s);
uint64_t ur_session_uffd_features(const struct ur_session *s); /* UFFD_FEATURE_* enabled */
/* How the session's userfaultfd was opened (one of the first three) and what
 * it lacks. ur_attach takes the first that this process is allowed:
 * /dev/userfaultfd, then userfaultfd(2), then userfaultfd(UFFD_USER_MODE_ONLY),
 * which any user may open. */
#define UR_UFFD_DEVICE 0x1 /* /dev/userfaultfd, USERFAULTFD_IOC_NEW */
#define UR_UFFD_SYSCALL 0x2 /* userfaultfd(2): root, CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1 */
#define UR_UFFD_USER_MODE_ONLY 0x4 /* userfaultfd(UFFD_USER_MODE_ONLY): a fault the kernel raises on
				      this process's behalf (read(2) into, write(2) from an unfilled
				      page) fails with EFAULT instead of waiting: copy through a buffer */
#define UR_UFFD_NO_FORK_EVENTS 0x8 /* UFFD_FEATURE_EVENT_FORK is off (no CAP_SYS_PTRACE, or
				      no_fork_events): see ur_attach_opts.no_fork_events */
unsigned ur_session_uffd_flags(const struct ur_session *s);
/* The socket, to poll(2) for POLLIN; then call ur_poll. */
int ur_session_socket(const struct ur_session *s);

/* Reads pending server notices without blocking (except to re-attach: when
 * the socket closed, it reconnects for up to reattach_timeout_ms, and then
 * returns 0 once re-attached): returns 1 if the server
 * asked this target to detach (it is shutting down), 0 if not, < 0 on error
 * (UR_ECLOSED: the server is gone; UR_EREFUSED: the server ended this
 * session, ur_session_error(s) says why, e.g. a fault it could not answer).
 * After either, a thread waiting in a fault on a page never filled stays
 * blocked (it never reads wrong bytes): poll the socket while touching the
 * regions, report the error and exit (PROTOCOL.md section 3.4). Do not
 * ur_close/ur_detach while such a thread waits: unregistering wakes it onto
 * whatever the backing holds (zeros where a page was never filled). */
int ur_poll(struct ur_session *s);

/* Re-attaches now (ur_poll does so by itself when the socket closes):
 * 0, or UR_ESNAPSHOT (the server on the path serves another snapshot or
 * layout: exit, a fault there would never be served), UR_EREFUSED (it
 * refused, e.g. it was restarted without --adopt), UR_EUNTRUSTED, or
 * UR_ETIMEDOUT (no server took it back within reattach_timeout_ms). */
int ur_reattach(struct ur_session *s);
/* How many times this session was re-attached. */
unsigned ur_session_reattaches(const struct ur_session *s);

/* Asks for this target's stats; copies the JSON object (NUL-terminated) to
 * buf. Returns its length, or -ERANGE if it does not fit. */
int ur_stats(struct ur_session *s, char *buf, size_t n);

/* Sends detach, waits for bye (copying its stats to buf when buf != NULL),
 * then unregisters, closes the userfaultfd, unmaps, closes the socket and
 * frees s, also on error. No thread may touch the regions any more. */
int ur_detach_stats(struct ur_session *s, char *buf, size_t n);
int ur_detach(struct ur_session *s);

/* Hangs up without a goodbye (the server frees its side when the socket
 * closes), unmaps and frees s. */
void ur_close(struct ur_session *s);

/*
 * Mappings the program makes itself (an unmodified program under the preload
 * library, a VMM that maps guest RAM where it wants):
 *
 *	struct ur_session *s;
 *	if (ur_connect("/run/snap.sock", NULL, &s) < 0) ... ur_session_error(NULL) ...
 *	const struct ur_region *r = ur_session_region(s, 0);
 *	void *a = mmap(want, r->size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED,
 *		       ur_session_backing_fd(s), (off_t)r->offset);
 *	if (ur_attach_mapping(s, a, r->size, 0, 0, MAP_PRIVATE) < 0) ... ur_session_error(s) ...
 *	... pages of a fill on first touch ...
 *
 * ur_connect does what ur_attach does up to the regions (the server's uid
 * check, the hello, the backing fd, the regions) and maps nothing. The server
 * waits at most its handshake timeout (10 s by default) for the first attach;
 * a later first ur_attach_mapping simply connects again.
 *
 * ur_session_backing_fd is the backing file the server sent (O_RDWR, or
 * O_RDONLY with `load --read-only-targets`: map it MAP_PRIVATE then). It
 * belongs to the session (closed by ur_detach/ur_close): map it, fstat it,
 * dup it, but do not close it, read(2) it or write(2) it (that bypasses the
 * server: pages not filled yet read as zeros). Every session keeps it, also
 * one made by ur_attach.
 *
 * ur_attach_mapping registers [addr, addr+len) with a new userfaultfd (minor
 * faults) and hands it to the server: the pages fill on first touch from
 * then on. addr must be where the program mapped the backing fd at file
 * offset region->offset + offset (MAP_FIXED at an address it chose or not),
 * with flags MAP_SHARED (every shared mapping sees the same pages, writes
 * included) or MAP_PRIVATE (copy-on-write: its writes are its own), as the
 * mmap had them. addr, len and offset are multiples of
 * ur_session_page_size(s) (2 MiB for a hugetlb backing); offset + len <= the
 * region's size. Checked before anything is registered or sent:
 *	UR_ENOREGION   region is not an index < ur_session_nregions, or is empty;
 *	UR_EMAPRANGE   misaligned, empty, or past the end of the region;
 *	UR_ENOTBACKING the range is not, all of it, a mapping of the backing fd at
 *		       that offset with that MAP_SHARED/MAP_PRIVATE (per the kernel's
 *		       /proc/self/maps), e.g. a hole or another file;
 *	-EBUSY	       it overlaps a range attached already (or another in the array);
 *	-EINVAL        flags neither MAP_SHARED nor MAP_PRIVATE; n out of 1..65536.
 * Then the server's errors as for ur_attach (UR_EREFUSED ...). On any error
 * nothing stays registered and the session is usable for another call.
 *
 * Any number of calls per session (a program may map the same region several
 * times): each call is one attach. The first call of a ur_connect session
 * uses its connection; every other call opens one more connection to the
 * same server (checked like the first: trusted uid, same snapshot, layout
 * and backing file) that stays open as long as the session. ur_stats
 * reports the first connection's target; ur_poll watches all of them.
 * Without fork events (UR_UFFD_NO_FORK_EVENTS) the ranges are made
 * MADV_DONTFORK, as ur_attach does. Re-attaching to a restarted server
 * (reattach_timeout_ms) covers only what ur_attach mapped, never these
 * ranges; a ur_connect session does not re-attach.
 *
 * ur_detach/ur_close unregister these ranges but leave them mapped (they
 * are the program's): after that, a page never filled reads what the
 * backing holds (zeros), so unmap them or stop touching them first. A range
 * the program munmaps or mremaps is followed by the server (events).
 */
int ur_connect(const char *socket_path, const struct ur_attach_opts *opts, struct ur_session **out);
int ur_session_backing_fd(const struct ur_session *s);

struct ur_mapping {
	void *addr; /* where the program mapped the backing */
	size_t len; /* bytes */
	size_t region; /* region index */
	uint64_t offset; /* offset in the region of the byte at addr */
	int flags; /* MAP_SHARED or MAP_PRIVATE, as mapped */
};
int ur_attach_mapping(struct ur_session *s, void *addr, size_t len, size_t region, uint64_t offset, int flags);
/* n mappings in one attach (one connection, one userfaultfd). */
int ur_attach_mappings(struct ur_session *s, const struct ur_mapping *m, size_t n);

const char *ur_strerror(int code);
/* The detailed message of the last failure on s, or of this thread's last
 * ur_attach when s is NULL. Never NULL. */
const char *ur_session_error(const struct ur_session *s);

#ifdef __cplusplus
}
#endif

#endif

/*
 * ur_spawn.h - start a program without waiting for it.
 *
 * posix_spawn(3) returns only once the child has called execve: on a VM whose
 * idle vCPU takes up to a scheduler tick to run a new task, that was 0.5-3.5
 * ms of restore.Open, which only needs the helper to exist by the time a
 * touch of the view faults. ur_spawn_start hands the posix_spawn to a thread
 * of its own and returns at once; ur_spawn_wait joins that thread and says
 * how the spawn went. The thread needs nothing of the caller's (a Go program
 * whose only P is held by a goroutine waiting in a fault the child will serve
 * still gets its child).
 */
#ifndef UR_SPAWN_H
#define UR_SPAWN_H

struct ur_spawn;

/*
 * ur_spawn_start starts path with argv and envp (NULL-terminated), with
 * fds[i] as its descriptor i for i < nfds (nfds <= 8) and every other
 * descriptor closed, its signal mask empty, after delay_us (0 but in tests,
 * which show that nothing waits for the spawn). It copies everything it is given
 * (the caller's descriptors stay the caller's). Returns 0 and *out, to be
 * passed to ur_spawn_wait exactly once, or -errno (nothing started).
 */
int ur_spawn_start(const char *path, char *const argv[], char *const envp[], const int *fds, int nfds,
		   unsigned delay_us, struct ur_spawn **out);

/*
 * ur_spawn_wait waits for the spawn and frees s: 0 and *pid, or -errno of
 * the fork or the exec (no child then).
 */
int ur_spawn_wait(struct ur_spawn *s, int *pid);

#endif

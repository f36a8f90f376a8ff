//! The container suite under runc.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "container/mod.rs"]
mod container;
use container::*;

#[path = "container/cases.rs"]
mod cases;

container_suite!(
    airlock::container::ContainerRuntime::Runc,
    [
        lifecycle_keeps_the_workspace_and_drops_the_rest,
        exec_streams_output_and_takes_env_cwd_and_stdin,
        the_deadline_kills_the_whole_process_tree,
        an_output_flood_is_cut_at_the_cap,
        a_fork_bomb_is_contained_by_the_pids_limit,
        a_memory_bomb_is_reported_as_out_of_memory,
        privileged_operations_are_denied,
        background_processes_are_listed_followed_signalled_and_awaited,
        a_pty_session_takes_input_and_resizes,
        a_port_inside_is_reachable_without_a_network,
        the_warm_pool_hands_out_frozen_sandboxes_and_refills,
        labelled_containers_are_listed_and_adopted,
        the_tier_seam_runs_in_the_workspace,
        bad_requests_get_clear_errors,
        cpu_time_comes_from_the_cgroup,
    ]
);

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::*;

fn workspace() -> (tempfile::TempDir, PathBuf, WorkspaceDir) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ws");
    std::fs::create_dir(&root).unwrap();
    let ws = WorkspaceDir::open(&root).unwrap();
    (dir, root, ws)
}

#[test]
fn files_round_trip_inside_the_workspace() {
    let (_dir, root, ws) = workspace();
    ws.write("a/b/c.txt", b"hello", None).unwrap();
    assert_eq!(ws.read("/workspace/a/b/c.txt", 100).unwrap(), b"hello");
    let listed = ws.list("a/b", 10).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].name.as_str(), listed[0].kind, listed[0].size), ("c.txt", EntryKind::File, 5));
    ws.rename("a/b/c.txt", "d/e.txt", None).unwrap();
    assert_eq!(ws.read("./d/e.txt", 100).unwrap(), b"hello");
    ws.write("d/e.txt", b"replaced", None).unwrap();
    assert_eq!(std::fs::read(root.join("d/e.txt")).unwrap(), b"replaced");
    ws.mkdir_all("f/g/h", None).unwrap();
    assert!(root.join("f/g/h").is_dir());
    ws.remove("f").unwrap();
    ws.remove("d/e.txt").unwrap();
    let names: Vec<String> = ws.list("", 10).unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(names, vec!["a", "d"]);
    assert_eq!(ws.stat("a").unwrap().kind, EntryKind::Directory);
    assert!(matches!(ws.read("a/b/c.txt", 100), Err(FsError::NotFound { .. })));
}

#[test]
fn a_failed_or_dropped_write_leaves_the_old_file() {
    let (_dir, root, ws) = workspace();
    ws.write("keep.txt", b"old", None).unwrap();
    let mut writer = ws.create("keep.txt", None).unwrap();
    writer.write_all(b"half of the new").unwrap();
    drop(writer);
    assert_eq!(std::fs::read(root.join("keep.txt")).unwrap(), b"old");
    let names: Vec<String> = ws.list("", 10).unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(names, vec!["keep.txt"], "no temporary file is left behind");
    assert!(ws.create(".airlock-upload-x", None).is_err(), "the temporary prefix is reserved");
}

#[test]
fn escapes_and_links_are_refused() {
    let (dir, root, ws) = workspace();
    std::fs::write(dir.path().join("secret"), b"s").unwrap();
    for (path, reason) in [
        ("../secret", "'..' is not allowed"),
        ("a/../../secret", "'..' is not allowed"),
        ("/etc/passwd", "absolute paths must be under /workspace"),
        ("/workspacefoo", "absolute paths must be under /workspace"),
        ("a\0b", "NUL"),
    ] {
        let error = ws.read(path, 100).unwrap_err().to_string();
        assert!(error.contains(reason), "{path}: {error}");
    }
    symlink(dir.path(), root.join("out")).unwrap();
    symlink("../../", root.join("up")).unwrap();
    symlink("/etc/passwd", root.join("passwd")).unwrap();
    std::fs::create_dir(root.join("in")).unwrap();
    symlink("in", root.join("inside")).unwrap();
    for path in ["out/secret", "up/secret", "passwd", "inside/x"] {
        assert!(matches!(ws.read(path, 100), Err(FsError::Symlink { .. })), "{path}");
    }
    for path in ["out/new", "up/new", "passwd", "inside/x"] {
        assert!(matches!(ws.write(path, b"x", None), Err(FsError::Symlink { .. })), "{path}");
    }
    assert!(matches!(ws.list("out", 10), Err(FsError::Symlink { .. })));
    assert!(matches!(ws.mkdir_all("out/made", None), Err(FsError::Symlink { .. })));
    assert!(matches!(ws.rename("in", "out/moved", None), Err(FsError::Symlink { .. })));
    assert!(!dir.path().join("new").exists() && !dir.path().join("made").exists());
    assert!(dir.path().join("secret").exists());
    // Removing a link removes the link only.
    ws.remove("passwd").unwrap();
    ws.remove("out").unwrap();
    assert!(std::path::Path::new("/etc/passwd").exists());
    assert!(dir.path().join("secret").exists());
    assert!(ws.write("", b"x", None).is_err(), "the workspace itself");
    assert!(ws.remove("/workspace").is_err(), "the workspace itself");
}

#[test]
fn special_files_are_refused_at_once_without_being_opened() {
    let (_dir, root, ws) = workspace();
    rustix::fs::mknodat(rustix::fs::CWD, root.join("fifo").as_path(), FileType::Fifo, Mode::from_raw_mode(0o666), 0)
        .unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(root.join("socket")).unwrap();
    for name in ["fifo", "socket"] {
        let started = Instant::now();
        assert!(matches!(ws.read(name, 100), Err(FsError::SpecialFile { .. })), "{name}");
        assert!(matches!(ws.open_read(name), Err(FsError::SpecialFile { .. })), "{name}");
        assert!(matches!(ws.write(name, b"x", None), Err(FsError::SpecialFile { .. })), "{name}");
        assert!(started.elapsed() < Duration::from_secs(1), "{name} answered at once");
        assert_ne!(ws.stat(name).unwrap().kind, EntryKind::File);
    }
    // Listing, renaming and removing them works on the names.
    assert_eq!(ws.list("", 10).unwrap().len(), 2);
    ws.rename("fifo", "fifo2", None).unwrap();
    ws.remove("fifo2").unwrap();
    ws.remove("socket").unwrap();
    assert!(ws.list("", 10).unwrap().is_empty());
}

#[test]
fn recursive_removal_never_follows_links() {
    let (dir, root, ws) = workspace();
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("keep"), b"k").unwrap();
    std::fs::create_dir_all(root.join("t/u/v")).unwrap();
    std::fs::write(root.join("t/u/v/file"), b"f").unwrap();
    symlink(&outside, root.join("t/u/link")).unwrap();
    symlink(&outside, root.join("t/u/v/link")).unwrap();
    ws.remove("t").unwrap();
    assert!(!root.join("t").exists());
    assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"k");
}

#[test]
fn deep_trees_are_bounded() {
    let (_dir, _root, ws) = workspace();
    let deep: Vec<&str> = std::iter::repeat_n("d", MAX_TREE_DEPTH + 3).collect();
    ws.mkdir_all(&deep.join("/"), None).unwrap();
    let error = ws.remove("d").unwrap_err().to_string();
    assert!(error.contains("deeper"), "{error}");
}

#[test]
fn listings_are_bounded() {
    let (_dir, _root, ws) = workspace();
    for i in 0..5 {
        ws.write(&format!("f{i}"), b"", None).unwrap();
    }
    assert_eq!(ws.list("", 5).unwrap().len(), 5);
    assert!(matches!(ws.list("", 4), Err(FsError::Limit { .. })));
}

#[test]
fn ownership_is_given_through_descriptors_and_never_through_links() {
    assert!(rustix::process::geteuid().is_root(), "changing owners needs root: run the tests as root");
    let (dir, root, ws) = workspace();
    let outside = dir.path().join("outside-file");
    std::fs::write(&outside, b"o").unwrap();
    let owner = Owner { uid: 4242, gid: 4343 };
    ws.write("made/by/host.txt", b"x", Some(owner)).unwrap();
    for path in ["made", "made/by", "made/by/host.txt"] {
        let meta = std::fs::symlink_metadata(root.join(path)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (4242, 4343), "{path}");
    }
    std::fs::create_dir_all(root.join("iso/sub")).unwrap();
    std::fs::write(root.join("iso/sub/f"), b"f").unwrap();
    symlink(&outside, root.join("iso/link")).unwrap();
    symlink(dir.path(), root.join("iso/sub/dirlink")).unwrap();
    let changed = ws.chown_tree(owner).unwrap();
    assert!(changed >= 5, "{changed}");
    for path in ["", "iso", "iso/sub", "iso/sub/f", "iso/link", "iso/sub/dirlink"] {
        let meta = std::fs::symlink_metadata(root.join(path)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (4242, 4343), "{path}");
    }
    let outside_meta = std::fs::metadata(&outside).unwrap();
    assert_eq!(outside_meta.uid(), rustix::process::geteuid().as_raw(), "the link's target keeps its owner");
    assert_eq!(std::fs::metadata(dir.path()).unwrap().uid(), rustix::process::geteuid().as_raw());
    assert_eq!(ws.chown_tree(owner).unwrap(), 0, "a second handover changes nothing");
}

/// A directory swapped with a link to a host directory in a tight loop, while
/// every operation goes through the swapped name thousands of times: nothing
/// outside is written, read, chowned or removed.
#[test]
fn a_directory_swapped_for_a_link_in_a_loop_never_leads_out() {
    let (dir, root, ws) = workspace();
    let host = dir.path().join("host");
    std::fs::create_dir(&host).unwrap();
    std::fs::write(host.join("secret"), b"host secret").unwrap();
    std::fs::write(host.join("victim"), b"keep me").unwrap();
    std::fs::create_dir(root.join("d")).unwrap();
    std::fs::write(root.join("d/secret"), b"workspace").unwrap();
    std::fs::write(root.join("d/victim"), b"workspace").unwrap();
    symlink(&host, root.join("swap")).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, ws) = (stop.clone(), ws.clone());
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                rustix::fs::renameat_with(ws.root(), "d", ws.root(), "swap", rustix::fs::RenameFlags::EXCHANGE)
                    .unwrap();
                swaps += 1;
            }
            swaps
        })
    };
    let owner = Owner { uid: 4242, gid: 4242 };
    let is_root = rustix::process::geteuid().is_root();
    for round in 0..3000 {
        let _ = ws.write("d/x", b"from the host", is_root.then_some(owner));
        if let Ok(bytes) = ws.read("d/secret", 100) {
            assert_eq!(bytes, b"workspace", "round {round}: read a host file");
        }
        if let Ok(mut pair) = ws.open_read("d/secret") {
            let mut text = String::new();
            pair.0.read_to_string(&mut text).unwrap();
            assert_eq!(text, "workspace");
        }
        let _ = ws.list("d", 100);
        let _ = ws.mkdir_all("d/m", None);
        let _ = ws.rename("d/x", "d/y", None);
        let _ = ws.remove("d/y");
        let _ = ws.remove("d/m");
        let _ = ws.remove("d/victim");
        let _ = ws.write("d/victim", b"workspace", None);
        if is_root && round % 50 == 0 {
            let _ = ws.chown_tree(owner);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps > 1000, "the swap loop ran ({swaps} swaps)");
    let mut names: Vec<String> =
        std::fs::read_dir(&host).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, vec!["secret", "victim"], "nothing was written into or removed from the host directory");
    assert_eq!(std::fs::read(host.join("victim")).unwrap(), b"keep me");
    assert_eq!(std::fs::read(host.join("secret")).unwrap(), b"host secret");
    for path in [&host, &host.join("secret"), &host.join("victim")] {
        assert_eq!(std::fs::metadata(path).unwrap().uid(), rustix::process::geteuid().as_raw(), "{path:?}");
    }
}

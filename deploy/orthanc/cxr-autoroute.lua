-- Orthanc auto-routing of chest radiographs to cxr-triage.
--
-- When a study has been quiet for "StableAge" seconds, every series whose Modality is CR
-- or DX and whose BodyPartExamined is CHEST (or THORAX) is sent to the modality named
-- CXR_TRIAGE in "DicomModalities".  cxr-triage's results come back to this Orthanc as a
-- Structured Report (Modality SR) and a Secondary Capture heatmap (Modality OT); they are
-- never routed again, so there is no loop.  The same rule can live in a commercial PACS as
-- an auto-routing rule (see deploy/PACS.md).

local TARGET = "CXR_TRIAGE"
local MODALITIES = { CR = true, DX = true }
local BODY_PARTS = { CHEST = true, THORAX = true }

local function upper(value)
  if value == nil then return "" end
  return string.upper(value)
end

function IsChestRadiograph(series)
  local tags = series["MainDicomTags"] or {}
  if not MODALITIES[upper(tags["Modality"])] then
    return false
  end
  local part = upper(tags["BodyPartExamined"])
  if part == "" then
    -- Some modalities put the body part only in the instances: look at the first one.
    local instances = ParseJson(RestApiGet("/series/" .. series["ID"] .. "/instances"))
    if #instances > 0 then
      local simplified = ParseJson(RestApiGet("/instances/" .. instances[1]["ID"] .. "/simplified-tags"))
      part = upper(simplified["BodyPartExamined"])
    end
  end
  return BODY_PARTS[part] == true
end

function OnStableStudy(studyId, tags, metadata)
  local series = ParseJson(RestApiGet("/studies/" .. studyId .. "/series"))
  local selected = {}
  for _, s in ipairs(series) do
    if IsChestRadiograph(s) then
      table.insert(selected, s["ID"])
    end
  end
  if #selected == 0 then
    return
  end
  PrintRecursive("cxr-triage: routing " .. #selected .. " chest series of study " .. studyId)
  local job = { Resources = selected, Synchronous = false, Priority = 0 }
  RestApiPost("/modalities/" .. TARGET .. "/store", DumpJson(job, true))
end
